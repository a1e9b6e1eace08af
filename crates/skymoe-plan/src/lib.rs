//! skymoe-plan: choose the parallel layout of an MoE training job.
//!
//! A pure cost model (no tensors): per-layer FLOPs, activation and state memory, and the
//! communication of tensor, expert (EP, ETP and Skywork's EDP), pipeline and data
//! parallelism on a described cluster; a planner that splits layers into non-uniform
//! pipeline stages with per-stage recomputation and ranks layouts by estimated step time.
//! The formulas are derived in docs/PLANNER.md.

pub mod cluster;
pub mod comm;
pub mod cost;
pub mod error;
pub mod job;
pub mod layout;
pub mod model;
pub mod pipeline;
pub mod planner;
pub mod table;

pub use cluster::{Cluster, CLUSTER_PRESETS};
pub use error::{PlanError, Result};
pub use job::{Job, Optimizer, Precision};
pub use layout::{Layout, LayoutSpec, Strategy};
pub use model::{ModelShape, MODEL_PRESETS};
pub use planner::{evaluate, plan_all, Plan, SplitChoice};

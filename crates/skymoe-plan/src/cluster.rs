//! Clusters: how many accelerators, how much memory, how fast they compute and talk.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{PlanError, Result};

/// One homogeneous cluster of nodes with `gpus_per_node` accelerators each.
///
/// Bandwidths are achievable unidirectional bandwidths *per accelerator*: `intra_gbps` between
/// two accelerators of one node (NVLink, PCIe), `inter_gbps` from one accelerator to another
/// node (its share of the node's network cards). All in GB/s (10^9 bytes per second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// A name for tables.
    pub name: String,
    /// Accelerators per node.
    pub gpus_per_node: usize,
    /// Nodes.
    pub nodes: usize,
    /// Memory per accelerator, GiB.
    pub mem_gib: f64,
    /// Memory per accelerator that training cannot use (runtime context, communication
    /// buffers, allocator fragmentation), GiB.
    pub reserved_gib: f64,
    /// Dense peak throughput in bf16/fp16, TFLOP/s.
    pub tflops: f64,
    /// Dense peak throughput for fp32 training (TF32 on NVIDIA GPUs), TFLOP/s.
    pub fp32_tflops: f64,
    /// Fraction of peak that large matrix products reach.
    pub matmul_efficiency: f64,
    /// Achievable memory bandwidth (HBM or DRAM), GB/s: bounds the element-wise work.
    pub mem_gbps: f64,
    /// Bandwidth between accelerators of one node, GB/s per accelerator.
    pub intra_gbps: f64,
    /// Bandwidth from one accelerator to other nodes, GB/s per accelerator.
    pub inter_gbps: f64,
    /// Start-up latency of one collective inside a node, µs.
    pub intra_latency_us: f64,
    /// Start-up latency of one collective across nodes, µs.
    pub inter_latency_us: f64,
    /// Fixed cost of one layer's forward and backward beyond its FLOPs and bytes (operator
    /// dispatch, thread synchronisation), µs. Zero for GPUs, whose kernels queue
    /// asynchronously; fitted by `skymoe plan --calibrate` on CPUs.
    #[serde(default)]
    pub layer_overhead_us: f64,
}

/// Names of the built-in cluster presets.
pub const CLUSTER_PRESETS: [&str; 4] = ["a800-80g", "h100-80g", "h800-80g", "rtx4090-24g"];

impl Cluster {
    /// A built-in preset with `nodes` nodes.
    ///
    /// - `a800-80g`: 8x A800-SXM4-80GB per node (312 TFLOP/s bf16, 2.0 TB/s HBM, NVLink capped
    ///   at 400 GB/s bidirectional = 200 GB/s per direction), one 200 Gb/s HDR InfiniBand card
    ///   per GPU (25 GB/s).
    /// - `h100-80g`: 8x H100-SXM5-80GB (989 TFLOP/s bf16 dense, 3.35 TB/s, NVLink 4 at 450 GB/s
    ///   per direction), one 400 Gb/s NDR card per GPU (50 GB/s).
    /// - `h800-80g`: 8x H800-SXM5-80GB, the H100 with NVLink capped at 400 GB/s bidirectional
    ///   (200 GB/s per direction), one 400 Gb/s NDR card per GPU (50 GB/s) — the cluster
    ///   DeepSeek-V3 was trained on.
    /// - `rtx4090-24g`: 8x RTX 4090 24 GB (165 TFLOP/s bf16 with fp32 accumulation, 1.0 TB/s),
    ///   PCIe 4.0 x16 between cards and no NVLink (~20 GB/s), 100 Gb/s Ethernet per node
    ///   (12.5 GB/s shared by 8 cards).
    pub fn preset(name: &str, nodes: usize) -> Option<Self> {
        let c = match name {
            "a800-80g" => Cluster {
                name: name.into(),
                gpus_per_node: 8,
                nodes,
                mem_gib: 80.0,
                reserved_gib: 3.0,
                tflops: 312.0,
                fp32_tflops: 156.0,
                matmul_efficiency: 0.7,
                mem_gbps: 2039.0 * 0.8,
                intra_gbps: 200.0 * 0.8,
                inter_gbps: 25.0 * 0.8,
                intra_latency_us: 10.0,
                inter_latency_us: 20.0,
                layer_overhead_us: 0.0,
            },
            "h100-80g" => Cluster {
                name: name.into(),
                gpus_per_node: 8,
                nodes,
                mem_gib: 80.0,
                reserved_gib: 3.0,
                tflops: 989.0,
                fp32_tflops: 494.0,
                matmul_efficiency: 0.7,
                mem_gbps: 3350.0 * 0.8,
                intra_gbps: 450.0 * 0.8,
                inter_gbps: 50.0 * 0.8,
                intra_latency_us: 10.0,
                inter_latency_us: 20.0,
                layer_overhead_us: 0.0,
            },
            "h800-80g" => Cluster {
                name: name.into(),
                gpus_per_node: 8,
                nodes,
                mem_gib: 80.0,
                reserved_gib: 3.0,
                tflops: 989.0,
                fp32_tflops: 494.0,
                matmul_efficiency: 0.7,
                mem_gbps: 3350.0 * 0.8,
                intra_gbps: 200.0 * 0.8,
                inter_gbps: 50.0 * 0.8,
                intra_latency_us: 10.0,
                inter_latency_us: 20.0,
                layer_overhead_us: 0.0,
            },
            "rtx4090-24g" => Cluster {
                name: name.into(),
                gpus_per_node: 8,
                nodes,
                mem_gib: 24.0,
                reserved_gib: 1.5,
                tflops: 165.0,
                fp32_tflops: 82.6,
                matmul_efficiency: 0.7,
                mem_gbps: 1008.0 * 0.8,
                intra_gbps: 20.0,
                inter_gbps: 12.5 / 8.0,
                intra_latency_us: 20.0,
                inter_latency_us: 40.0,
                layer_overhead_us: 0.0,
            },
            _ => return None,
        };
        Some(c)
    }

    /// A preset name, or a JSON file holding a [`Cluster`] (as `skymoe plan --calibrate`
    /// writes). `nodes` overrides the node count when given.
    pub fn load(spec: &str, nodes: Option<usize>) -> Result<Self> {
        let mut c = match Self::preset(spec, nodes.unwrap_or(1)) {
            Some(c) => c,
            None => {
                let path = Path::new(spec);
                if !path.is_file() {
                    return Err(PlanError::Cluster(format!(
                        "`{spec}` is neither a preset ({}) nor a cluster JSON file",
                        CLUSTER_PRESETS.join(", ")
                    )));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|e| PlanError::Cluster(format!("cannot read {spec}: {e}")))?;
                serde_json::from_str(&text)
                    .map_err(|e| PlanError::Cluster(format!("{spec} is not a cluster file: {e}")))?
            }
        };
        if let Some(n) = nodes {
            c.nodes = n;
        }
        Ok(c)
    }

    /// Accelerators in the whole cluster.
    pub fn world(&self) -> usize {
        self.gpus_per_node * self.nodes
    }

    /// Check that every number is physically meaningful; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.gpus_per_node == 0 {
            return Err(PlanError::Cluster(
                "gpus_per_node must be at least 1".into(),
            ));
        }
        if self.nodes == 0 {
            return Err(PlanError::Cluster("nodes must be at least 1".into()));
        }
        let positive = [
            ("mem_gib", self.mem_gib),
            ("tflops", self.tflops),
            ("fp32_tflops", self.fp32_tflops),
            ("mem_gbps", self.mem_gbps),
            ("intra_gbps", self.intra_gbps),
            ("inter_gbps", self.inter_gbps),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(PlanError::Cluster(format!(
                    "{name} must be a positive number, got {v}"
                )));
            }
        }
        if !(self.matmul_efficiency > 0.0 && self.matmul_efficiency <= 1.0) {
            return Err(PlanError::Cluster(format!(
                "matmul_efficiency must be in (0, 1], got {}",
                self.matmul_efficiency
            )));
        }
        for (name, v) in [
            ("reserved_gib", self.reserved_gib),
            ("intra_latency_us", self.intra_latency_us),
            ("inter_latency_us", self.inter_latency_us),
            ("layer_overhead_us", self.layer_overhead_us),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(PlanError::Cluster(format!(
                    "{name} must be zero or positive, got {v}"
                )));
            }
        }
        if self.reserved_gib >= self.mem_gib {
            return Err(PlanError::Cluster(format!(
                "reserved_gib ({}) leaves nothing of mem_gib ({})",
                self.reserved_gib, self.mem_gib
            )));
        }
        Ok(())
    }

    /// Memory per accelerator available to weights, optimiser state and activations, bytes.
    pub fn usable_bytes(&self) -> f64 {
        (self.mem_gib - self.reserved_gib) * GIB
    }
}

/// Bytes in a GiB.
pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

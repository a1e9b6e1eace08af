//! `skymoe plan`: choose the parallel layout of an MoE training job on a cluster.

use std::path::PathBuf;

use anyhow::{bail, Context};
use skymoe_plan::layout::parse_counts;
use skymoe_plan::planner::{evaluate, plan_all, SplitChoice};
use skymoe_plan::{Cluster, Job, LayoutSpec, ModelShape, Optimizer, Precision};

use super::calibrate;

/// Arguments of `skymoe plan`.
#[derive(clap::Args)]
pub struct Args {
    /// A model: a preset (skywork-moe-146b, mixtral-8x7b, qwen2-moe-57b, qwen3-30b-a3b, deepseek-v3), a config.json, or a
    /// model directory.
    #[arg(long, required_unless_present = "calibrate")]
    model: Option<String>,
    /// A cluster: a preset (a800-80g, h100-80g, h800-80g, rtx4090-24g) or a cluster JSON file (as
    /// `--calibrate` writes).
    #[arg(long, required_unless_present = "calibrate")]
    cluster: Option<String>,
    /// Nodes.
    #[arg(long)]
    nodes: Option<usize>,
    /// Override the accelerators per node.
    #[arg(long)]
    gpus_per_node: Option<usize>,
    /// Override the memory per accelerator, GiB.
    #[arg(long)]
    mem_gib: Option<f64>,
    /// Override the peak bf16 TFLOP/s per accelerator.
    #[arg(long)]
    tflops: Option<f64>,
    /// Override the intra-node bandwidth, GB/s per accelerator.
    #[arg(long)]
    intra_gbps: Option<f64>,
    /// Override the inter-node bandwidth, GB/s per accelerator.
    #[arg(long)]
    inter_gbps: Option<f64>,
    /// Tokens per optimiser step over all replicas.
    #[arg(long, required_unless_present = "calibrate")]
    global_batch_tokens: Option<u64>,
    /// Sequence length.
    #[arg(long, required_unless_present = "calibrate")]
    seq_len: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 1)]
    micro_batch: usize,
    /// bf16, fp16 or fp32.
    #[arg(long, default_value = "bf16")]
    precision: String,
    /// adamw or sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Consider only this ZeRO stage (default: 0 to 3).
    #[arg(long)]
    zero: Option<u8>,
    /// MoE capacity factor (≤ 0: dropless).
    #[arg(long, default_value_t = 1.0)]
    capacity_factor: f64,
    /// Evaluate only this layout, e.g. `edp=4,pp=12,dp=32,zero=1`.
    #[arg(long)]
    layout: Option<String>,
    /// With --layout: layers per stage instead of the planner's split, e.g. 5,7,7,5.
    #[arg(long)]
    pp_layers: Option<String>,
    /// With --layout: recomputed layers per stage instead of the fewest that fit.
    #[arg(long)]
    recompute_layers: Option<String>,
    /// Rows of the table.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print a JSON array of layouts, best first.
    #[arg(long)]
    json: bool,
    /// Time the training code on this machine and fit the cost model's compute constants.
    #[arg(long)]
    calibrate: bool,
    /// With --calibrate: write the fitted machine as a cluster JSON file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// With --calibrate: a quick fit with fewer, smaller timings.
    #[arg(long)]
    quick: bool,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    if a.calibrate {
        return calibrate::run(a.out.as_deref(), a.quick, a.json);
    }
    let (Some(model), Some(cluster), Some(tokens), Some(seq_len)) =
        (&a.model, &a.cluster, a.global_batch_tokens, a.seq_len)
    else {
        bail!("--model, --cluster, --global-batch-tokens and --seq-len are required");
    };
    let model = ModelShape::load(model)?;
    let mut cluster = Cluster::load(cluster, a.nodes)?;
    if let Some(g) = a.gpus_per_node {
        cluster.gpus_per_node = g;
    }
    if let Some(m) = a.mem_gib {
        cluster.mem_gib = m;
    }
    if let Some(t) = a.tflops {
        cluster.fp32_tflops *= t / cluster.tflops;
        cluster.tflops = t;
    }
    if let Some(b) = a.intra_gbps {
        cluster.intra_gbps = b;
    }
    if let Some(b) = a.inter_gbps {
        cluster.inter_gbps = b;
    }
    cluster.validate()?;
    let job = Job {
        micro_batch: a.micro_batch,
        precision: Precision::parse(&a.precision)?,
        optimizer: Optimizer::parse(&a.optimizer)?,
        capacity_factor: a.capacity_factor,
        ..Job::new(tokens, seq_len)
    };
    job.validate()?;
    let zero_stages: Vec<u8> = match a.zero {
        Some(z) if z > 3 => bail!("--zero {z}: ZeRO stages are 0 to 3"),
        Some(z) => vec![z],
        None => vec![0, 1, 2, 3],
    };
    let plans = match &a.layout {
        Some(text) => {
            let layout = LayoutSpec::parse(text)?.resolve(cluster.world(), a.zero.unwrap_or(1))?;
            let choice = SplitChoice {
                pp_layers: a.pp_layers.as_deref().map(parse_counts).transpose()?,
                recompute: a
                    .recompute_layers
                    .as_deref()
                    .map(parse_counts)
                    .transpose()?,
            };
            vec![evaluate(&model, &cluster, &job, layout, &choice)?]
        }
        None => {
            if a.pp_layers.is_some() || a.recompute_layers.is_some() {
                bail!("--pp-layers and --recompute-layers need --layout");
            }
            plan_all(&model, &cluster, &job, &zero_stages)?
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plans).context("cannot write JSON")?
        );
    } else {
        let gpus = cluster.world();
        println!(
            "{}: {:.1}B parameters ({:.1}B active), {} layers, {} experts; {} × {} {} = {gpus} GPUs; {} tokens per step, sequences of {}, micro-batch {}",
            model.name,
            model.total_params() / 1e9,
            model.active_params() / 1e9,
            model.layers,
            model.experts(),
            cluster.nodes,
            cluster.gpus_per_node,
            cluster.name,
            job.global_batch_tokens,
            job.seq_len,
            job.micro_batch,
        );
        let feasible = plans.iter().filter(|p| p.feasible).count();
        println!("{} layouts evaluated, {feasible} fit\n", plans.len());
        let shown = &plans[..plans.len().min(a.top.max(1))];
        print!("{}", skymoe_plan::table::render(shown));
        println!("\ntime columns are seconds per step: compute, recomputation, tp+ep collectives, pp+dp transfers, optimiser, pipeline bubble");
        if let Some(best) = plans.first().filter(|p| p.feasible) {
            println!("\nbest: skymoe train {}", best.args);
        }
    }
    if let Some(p) = plans.first().filter(|p| !p.feasible) {
        bail!(
            "no layout fits; the closest, {}: {}",
            p.args,
            p.why_infeasible.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}

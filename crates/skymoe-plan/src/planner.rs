//! Evaluate a layout (stage split, recomputation, memory, step time) and rank all layouts.

use serde::Serialize;

use crate::cluster::{Cluster, GIB};
use crate::cost::{CostModel, EdgeCost, LayerCost, Work};
use crate::error::Result;
use crate::job::Job;
use crate::layout::{check_stage_layers, Layout};
use crate::model::ModelShape;
use crate::pipeline::{best_split, bubble_fraction, one_f_one_b, uniform_split};

/// One pipeline stage of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StagePlan {
    /// Decoder layers.
    pub layers: usize,
    /// Of those, recomputed (activation-checkpointed) layers.
    pub recompute: usize,
    /// Peak memory per accelerator, GiB (reserved memory included).
    pub mem_gib: f64,
    /// Forward plus backward time of one micro-batch, seconds.
    pub time_s: f64,
}

/// Where one optimiser step's time goes, seconds. The pipeline parts are those of the
/// slowest stage over all micro-batches; they add up to `step_time_s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Breakdown {
    /// Matrix products and element-wise work, recomputation excluded.
    pub compute_s: f64,
    /// Forward passes repeated for recomputed layers (their communication included).
    pub recompute_s: f64,
    /// Tensor-parallel collectives.
    pub tp_comm_s: f64,
    /// Expert dispatch/combine.
    pub ep_comm_s: f64,
    /// Activations sent between stages.
    pub pp_comm_s: f64,
    /// Pipeline fill and drain (and waiting on slower stages).
    pub bubble_s: f64,
    /// Gradient reduction and weight gathering over data-parallel groups.
    pub dp_comm_s: f64,
    /// The optimiser update.
    pub optimizer_s: f64,
}

/// Bytes one rank sends per optimiser step, GiB (the rank of the stage with the most
/// MoE layers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Traffic {
    /// Expert dispatch/combine inside the node.
    pub ep_intra_gib: f64,
    /// Expert dispatch/combine to other nodes.
    pub ep_inter_gib: f64,
    /// Tensor-parallel collectives.
    pub tp_gib: f64,
    /// Data-parallel gradient and weight collectives of the non-expert weights.
    pub dp_gib: f64,
    /// Expert-data-parallel gradient and weight collectives of the expert weights.
    pub expert_dp_gib: f64,
}

/// A layout with its estimated memory and time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Tensor parallel.
    pub tp: usize,
    /// Expert parallel.
    pub ep: usize,
    /// EDP degree (TP = EP = edp with whole experts), 1 when not EDP.
    pub edp: usize,
    /// Expert tensor parallel.
    pub etp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Data parallel.
    pub dp: usize,
    /// ZeRO stage.
    pub zero: u8,
    /// EDP, EP, ETP, EP+ETP or `-` (experts replicated).
    pub strategy: String,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Micro-batches per step on each data-parallel replica.
    pub micro_batches: usize,
    /// Decoder layers per stage.
    pub pp_layers: Vec<usize>,
    /// Recomputed layers per stage.
    pub recompute_layers: Vec<usize>,
    /// Per-stage detail.
    pub stages: Vec<StagePlan>,
    /// Peak memory of the fullest stage, GiB per accelerator.
    pub mem_gib_per_gpu: f64,
    /// Estimated time of one optimiser step, seconds.
    pub step_time_s: f64,
    /// Idle fraction of the pipeline.
    pub bubble_fraction: f64,
    /// Model FLOPs utilisation.
    pub mfu: f64,
    /// Training tokens per accelerator per second.
    pub tokens_per_gpu_s: f64,
    /// Where the step time goes.
    pub breakdown: Breakdown,
    /// Communication volume.
    pub traffic: Traffic,
    /// Whether the layout fits memory and the batch.
    pub feasible: bool,
    /// What does not fit, and by how much.
    pub why_infeasible: Option<String>,
    /// The command-line arguments that run this layout with `skymoe train`.
    pub args: String,
    /// What the plan leaves out or restricts for this model (MTP layers, no tensor
    /// parallelism for latent attention, dense first layers, the inference KV cache).
    pub notes: Vec<String>,
}

/// How the stage split and recomputation are chosen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SplitChoice {
    /// Layers per stage; chosen by the planner when `None`.
    pub pp_layers: Option<Vec<usize>>,
    /// Recomputed layers per stage; the fewest that fit memory when `None`.
    pub recompute: Option<Vec<usize>>,
}

/// Costs shared by the stages of one layout.
struct Stages<'a> {
    cost: CostModel<'a>,
    moe: LayerCost,
    dense: LayerCost,
    embedding: EdgeCost,
    head: EdgeCost,
    /// moe_prefix[j]: MoE layers among the first j.
    moe_prefix: Vec<usize>,
    micro: usize,
    budget: f64,
}

/// One stage evaluated.
#[derive(Debug, Clone, Copy)]
struct StageEval {
    time: f64,
    mem: f64,
    recompute: usize,
    train: Work,
    recompute_work: Work,
    pp_comm: f64,
    dense_params: f64,
    expert_params: f64,
    moe_layers: usize,
}

impl Stages<'_> {
    fn new<'a>(cost: CostModel<'a>, micro: usize) -> Stages<'a> {
        let model = cost.model;
        let moe_layer = (0..model.layers).find(|&l| model.is_moe_layer(l));
        let dense_layer = (0..model.layers).find(|&l| !model.is_moe_layer(l));
        let moe = moe_layer.map(|l| cost.layer(l)).unwrap_or_default();
        let dense = dense_layer.map(|l| cost.layer(l)).unwrap_or_default();
        let mut moe_prefix = vec![0];
        for l in 0..model.layers {
            moe_prefix.push(moe_prefix[l] + usize::from(model.is_moe_layer(l)));
        }
        let embedding = cost.embedding();
        let head = cost.head();
        let budget = cost.cluster.usable_bytes();
        Stages {
            cost,
            moe,
            dense,
            embedding,
            head,
            moe_prefix,
            micro,
            budget,
        }
    }

    fn pp(&self) -> usize {
        self.cost.layout.pp
    }

    /// Stage `i` holding layers `a..b`, recomputing `recompute` layers (MoE layers first), or
    /// the fewest that fit memory when `None`. Memory may exceed the budget only when
    /// `recompute` is given.
    fn eval(&self, i: usize, a: usize, b: usize, recompute: Option<usize>) -> Option<StageEval> {
        let pp = self.pp();
        let n_moe = self.moe_prefix[b] - self.moe_prefix[a];
        let n_dense = (b - a) - n_moe;
        let in_flight = (pp - i).min(self.micro) as f64;
        let first = i == 0;
        let last = i == pp - 1;
        let tied_once = self.cost.model.tied_embeddings && pp == 1;

        let mut dense_params =
            n_moe as f64 * self.moe.dense_params + n_dense as f64 * self.dense.dense_params;
        let expert_params = n_moe as f64 * self.moe.expert_params;
        let mut edge_work = Work::default();
        let mut edge_act = 0.0;
        let mut transient: f64 = 0.0;
        if first {
            dense_params += self.embedding.params;
            edge_work = edge_work + self.embedding.work;
        }
        if last {
            dense_params += if tied_once {
                self.head.params - self.embedding.params
            } else {
                self.head.params
            };
            edge_work = edge_work + self.head.work;
            edge_act += self.head.activation_bytes;
            transient = transient.max(self.head.transient_bytes);
        }
        let state = self.cost.state_bytes(dense_params, expert_params);
        let act_full = n_moe as f64 * self.moe.activation_bytes
            + n_dense as f64 * self.dense.activation_bytes
            + edge_act;
        let base = state + in_flight * act_full + transient;

        // Recompute MoE layers first: they free the most memory.
        let mut kinds = [
            (
                &self.moe,
                n_moe,
                self.moe.activation_bytes - self.moe.checkpoint_bytes,
            ),
            (
                &self.dense,
                n_dense,
                self.dense.activation_bytes - self.dense.checkpoint_bytes,
            ),
        ];
        if kinds[1].2 > kinds[0].2 {
            kinds.swap(0, 1);
        }
        let workspace = |r: usize| {
            if r == 0 {
                0.0
            } else {
                kinds
                    .iter()
                    .filter(|k| k.1 > 0)
                    .map(|k| k.0.activation_bytes)
                    .fold(0.0, f64::max)
            }
        };
        let mem_with = |counts: [usize; 2]| {
            let saved: f64 = (0..2).map(|k| counts[k] as f64 * kinds[k].2).sum();
            base - in_flight * saved + workspace(counts[0] + counts[1])
        };
        let counts = match recompute {
            Some(r) => {
                let r = r.min(b - a);
                let c0 = r.min(kinds[0].1);
                [c0, r - c0]
            }
            None => {
                let mut counts = [0usize, 0usize];
                if mem_with(counts) > self.budget {
                    for k in 0..2 {
                        // Smallest count of this kind (the previous kinds all recomputed) that fits.
                        let mut lo = 0;
                        let mut hi = kinds[k].1;
                        let mut c = counts;
                        c[k] = hi;
                        if mem_with(c) > self.budget {
                            counts = c;
                            continue;
                        }
                        while lo < hi {
                            let mid = (lo + hi) / 2;
                            c[k] = mid;
                            if mem_with(c) <= self.budget {
                                hi = mid;
                            } else {
                                lo = mid + 1;
                            }
                        }
                        counts[k] = lo;
                        break;
                    }
                    if mem_with(counts) > self.budget {
                        return None;
                    }
                }
                counts
            }
        };
        let mem = mem_with(counts) + self.cost.cluster.reserved_gib * GIB;
        let train =
            self.moe.train() * n_moe as f64 + self.dense.train() * n_dense as f64 + edge_work;
        let recompute_work =
            kinds[0].0.forward * counts[0] as f64 + kinds[1].0.forward * counts[1] as f64;
        let send = self.cost.stage_send().seconds;
        let pp_comm = send * (usize::from(!last) + usize::from(!first)) as f64;
        Some(StageEval {
            time: train.total() + recompute_work.total() + pp_comm,
            mem,
            recompute: counts[0] + counts[1],
            train,
            recompute_work,
            pp_comm,
            dense_params,
            expert_params,
            moe_layers: n_moe,
        })
    }
}

/// Estimate one layout. Layout errors (see [`Layout::check`]) are returned as errors; a layout
/// that is valid but does not fit memory or the batch is a plan with `feasible: false`.
pub fn evaluate(
    model: &ModelShape,
    cluster: &Cluster,
    job: &Job,
    layout: Layout,
    choice: &SplitChoice,
) -> Result<Plan> {
    cluster.validate()?;
    job.validate()?;
    layout.check(model)?;
    if layout.world() != cluster.world() {
        return Err(crate::error::PlanError::Layout(format!(
            "tp={} × pp={} × dp={} = {} ranks, but the cluster has {} GPUs",
            layout.tp,
            layout.pp,
            layout.dp,
            layout.world(),
            cluster.world()
        )));
    }
    if let Some(split) = &choice.pp_layers {
        check_stage_layers(split, layout.pp, model.layers)?;
    }
    if let Some(r) = &choice.recompute {
        if r.len() != layout.pp {
            return Err(crate::error::PlanError::Layout(format!(
                "{} recompute counts given for pp={}",
                r.len(),
                layout.pp
            )));
        }
    }
    let sequences = job.global_sequences();
    let per_step = (layout.dp * job.micro_batch) as u64;
    let micro = (sequences / per_step) as usize;
    let mut plan = Plan {
        tp: layout.tp,
        ep: layout.ep,
        edp: layout.edp(),
        etp: layout.etp,
        pp: layout.pp,
        dp: layout.dp,
        zero: layout.zero,
        strategy: layout.strategy().name().to_string(),
        micro_batch: job.micro_batch,
        micro_batches: micro,
        pp_layers: Vec::new(),
        recompute_layers: Vec::new(),
        stages: Vec::new(),
        mem_gib_per_gpu: 0.0,
        step_time_s: f64::INFINITY,
        bubble_fraction: 0.0,
        mfu: 0.0,
        tokens_per_gpu_s: 0.0,
        breakdown: Breakdown::default(),
        traffic: Traffic::default(),
        feasible: false,
        why_infeasible: None,
        args: String::new(),
        notes: model.notes(),
    };
    if !sequences.is_multiple_of(per_step) || micro == 0 {
        plan.why_infeasible = Some(format!(
            "the global batch of {sequences} sequences does not divide into dp={} × micro-batch={} ({} left over)",
            layout.dp,
            job.micro_batch,
            sequences % per_step
        ));
        plan.pp_layers = uniform_split(model.layers, layout.pp);
        plan.args = args(&layout, &plan.pp_layers, &vec![0; layout.pp]);
        return Ok(plan);
    }
    let cost = CostModel {
        model,
        cluster,
        job,
        layout,
    };
    let stages = Stages::new(cost, micro);
    let pp = layout.pp;
    let recompute_at = |i: usize| choice.recompute.as_ref().map(|r| r[i]);

    let split = match &choice.pp_layers {
        Some(s) => Some(s.clone()),
        None => best_split(model.layers, pp, |i, a, b| {
            stages.eval(i, a, b, recompute_at(i)).and_then(|e| {
                (choice.recompute.is_none() || e.mem <= cluster.mem_gib * GIB)
                    .then_some((e.time, e.mem))
            })
        }),
    };
    let fits = split.is_some();
    // Without a split that fits: show the uniform split with every layer recomputed.
    let split = split.unwrap_or_else(|| uniform_split(model.layers, pp));
    let mut evals = Vec::with_capacity(pp);
    let mut start = 0;
    for (i, &n) in split.iter().enumerate() {
        let forced = if fits { recompute_at(i) } else { Some(n) };
        let e = stages
            .eval(i, start, start + n, forced)
            .or_else(|| stages.eval(i, start, start + n, Some(n)))
            .expect("a stage with a forced recompute count always evaluates");
        evals.push(e);
        start += n;
    }
    let usable = cluster.mem_gib;
    if let Some((k, worst)) = evals
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.mem.total_cmp(&b.1.mem))
        .filter(|(_, e)| e.mem > usable * GIB)
    {
        plan.why_infeasible = Some(format!(
            "stage {k} needs {:.1} GiB per GPU with {} of its {} layers recomputed ({:.1} GiB of it weights, gradients and optimiser state); the GPUs have {:.1} GiB ({:.1} reserved): short by {:.1} GiB",
            worst.mem / GIB,
            worst.recompute,
            split[k],
            stages.cost.state_bytes(worst.dense_params, worst.expert_params) / GIB,
            usable,
            cluster.reserved_gib,
            (worst.mem / GIB) - usable
        ));
    }
    let times: Vec<f64> = evals.iter().map(|e| e.time).collect();
    let pipe = one_f_one_b(&times, micro);
    let syncs: Vec<(f64, f64)> = evals
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut dp = stages
                .cost
                .data_parallel_sync(e.dense_params, e.expert_params, micro)
                .seconds;
            if model.tied_embeddings && pp > 1 && (i == 0 || i == pp - 1) {
                // The two copies of the tied embedding sum their gradients.
                let bytes = stages.embedding.params * job.bytes_per_param().grad;
                dp += 2.0 * stages.cost.send_between_stages(bytes).seconds;
            }
            (
                dp,
                stages
                    .cost
                    .optimizer_seconds(e.dense_params, e.expert_params),
            )
        })
        .collect();
    let (dp_s, opt_s) = syncs
        .iter()
        .cloned()
        .max_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)))
        .unwrap_or_default();
    let step = pipe + dp_s + opt_s;
    let world = cluster.world() as f64;
    let tokens = job.global_batch_tokens as f64;
    let model_flops: f64 = 3.0
        * tokens
        * ((0..model.layers)
            .map(|l| stages.cost.model_flops_per_token(l))
            .sum::<f64>()
            + stages.cost.head_flops_per_token());
    let (slow, slow_eval) = evals
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.time.total_cmp(&b.1.time))
        .expect("at least one stage");
    let m = micro as f64;
    plan.breakdown = Breakdown {
        compute_s: m * slow_eval.train.compute,
        recompute_s: m * slow_eval.recompute_work.total(),
        tp_comm_s: m * slow_eval.train.tp_comm,
        ep_comm_s: m * slow_eval.train.ep_comm,
        pp_comm_s: m * slow_eval.pp_comm,
        bubble_s: pipe - m * times[slow],
        dp_comm_s: dp_s,
        optimizer_s: opt_s,
    };
    let most_moe = evals
        .iter()
        .max_by_key(|e| e.moe_layers)
        .expect("at least one stage");
    let recompute_moe = most_moe.recompute.min(most_moe.moe_layers) as f64;
    let moe_passes = m * (most_moe.moe_layers as f64 + recompute_moe / 2.0);
    let dp_traffic = stages
        .cost
        .data_parallel_sync(most_moe.dense_params, 0.0, micro);
    let expert_dp_traffic = stages
        .cost
        .data_parallel_sync(0.0, most_moe.expert_params, micro);
    plan.traffic = Traffic {
        ep_intra_gib: moe_passes * stages.moe.ep_bytes.0 / GIB,
        ep_inter_gib: moe_passes * stages.moe.ep_bytes.1 / GIB,
        tp_gib: m
            * (most_moe.moe_layers as f64 * stages.moe.tp_bytes
                + (split[0] - most_moe.moe_layers.min(split[0])) as f64 * stages.dense.tp_bytes)
            / GIB,
        dp_gib: (dp_traffic.intra_bytes + dp_traffic.inter_bytes) / GIB,
        expert_dp_gib: (expert_dp_traffic.intra_bytes + expert_dp_traffic.inter_bytes) / GIB,
    };
    plan.stages = split
        .iter()
        .zip(&evals)
        .map(|(&layers, e)| StagePlan {
            layers,
            recompute: e.recompute,
            mem_gib: e.mem / GIB,
            time_s: e.time,
        })
        .collect();
    plan.recompute_layers = evals.iter().map(|e| e.recompute).collect();
    plan.pp_layers = split;
    plan.mem_gib_per_gpu = evals.iter().map(|e| e.mem).fold(0.0, f64::max) / GIB;
    plan.step_time_s = step;
    plan.bubble_fraction = bubble_fraction(&times, micro);
    plan.mfu = model_flops / (step * world * stages.cost.peak_flops_per_s());
    plan.tokens_per_gpu_s = tokens / (step * world);
    plan.feasible = plan.why_infeasible.is_none();
    plan.args = args(&layout, &plan.pp_layers, &plan.recompute_layers);
    Ok(plan)
}

/// The plan a uniform pipeline would give, as Megatron-LM lays it out: layers spread evenly
/// (the extra ones on the first stages) and one recomputation count for every stage, the
/// smallest that lets the fullest stage fit.
pub fn uniform_baseline(
    model: &ModelShape,
    cluster: &Cluster,
    job: &Job,
    layout: Layout,
) -> Result<Plan> {
    let split = uniform_split(model.layers, layout.pp);
    let free = SplitChoice {
        pp_layers: Some(split.clone()),
        recompute: None,
    };
    let first = evaluate(model, cluster, job, layout, &free)?;
    let r = first.recompute_layers.iter().copied().max().unwrap_or(0);
    let per_stage: Vec<usize> = split.iter().map(|&n| r.min(n)).collect();
    evaluate(
        model,
        cluster,
        job,
        layout,
        &SplitChoice {
            pp_layers: Some(split),
            recompute: Some(per_stage),
        },
    )
}

fn join(v: &[usize]) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// `--parallel ... --pp-layers ... --recompute-layers ...` for `skymoe train`.
fn args(layout: &Layout, pp_layers: &[usize], recompute: &[usize]) -> String {
    let mut s = format!("--parallel {}", layout.to_arg());
    if layout.pp > 1 {
        s += &format!(" --pp-layers {}", join(pp_layers));
    }
    if recompute.iter().any(|&r| r > 0) {
        s += &format!(" --recompute-layers {}", join(recompute));
    }
    s
}

/// All layouts of `world` ranks the model admits: TP inside a node dividing the heads, every
/// PP degree up to the layer count, EP over the divisors of the expert count that divide
/// TP × DP, experts whole or split over TP, and the given ZeRO stages.
pub fn enumerate_layouts(model: &ModelShape, cluster: &Cluster, zero_stages: &[u8]) -> Vec<Layout> {
    let world = cluster.world();
    let divisors = |n: usize| (1..=n).filter(move |d| n.is_multiple_of(*d));
    let mut out = Vec::new();
    for tp in divisors(cluster.gpus_per_node.min(world)) {
        if !world.is_multiple_of(tp) {
            continue;
        }
        for pp in divisors(world / tp).filter(|&p| p <= model.layers) {
            let dp = world / (tp * pp);
            let etps: Vec<usize> = if tp > 1 { vec![1, tp] } else { vec![1] };
            let eps: Vec<usize> = match &model.moe {
                Some(m) => divisors(m.experts).collect(),
                None => vec![1],
            };
            for &etp in &etps {
                for &ep in &eps {
                    if model.moe.is_none() && etp != tp {
                        continue;
                    }
                    for &zero in zero_stages {
                        // Without replicas ZeRO shards nothing: keep one stage.
                        let replicated = dp > 1 || tp * dp > ep * etp;
                        if !replicated && zero != zero_stages[0] {
                            continue;
                        }
                        let layout = Layout {
                            tp,
                            ep,
                            etp,
                            pp,
                            dp,
                            zero,
                        };
                        if layout.check(model).is_ok() {
                            out.push(layout);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Evaluate every layout (see [`enumerate_layouts`]) and rank them: feasible ones first, by
/// step time, then by memory.
pub fn plan_all(
    model: &ModelShape,
    cluster: &Cluster,
    job: &Job,
    zero_stages: &[u8],
) -> Result<Vec<Plan>> {
    cluster.validate()?;
    job.validate()?;
    let mut plans = Vec::new();
    for layout in enumerate_layouts(model, cluster, zero_stages) {
        plans.push(evaluate(
            model,
            cluster,
            job,
            layout,
            &SplitChoice::default(),
        )?);
    }
    sort_plans(&mut plans);
    Ok(plans)
}

/// Feasible plans first, faster first, then less memory; then the plans that do not fit,
/// closest to fitting first.
pub fn sort_plans(plans: &mut [Plan]) {
    plans.sort_by(|a, b| {
        b.feasible.cmp(&a.feasible).then(if a.feasible {
            a.step_time_s
                .total_cmp(&b.step_time_s)
                .then(a.mem_gib_per_gpu.total_cmp(&b.mem_gib_per_gpu))
        } else {
            a.mem_gib_per_gpu
                .total_cmp(&b.mem_gib_per_gpu)
                .then(a.step_time_s.total_cmp(&b.step_time_s))
        })
    });
}

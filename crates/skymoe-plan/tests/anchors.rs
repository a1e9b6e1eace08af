//! The planner against the figures of the Skywork-MoE report. Each anchor states its
//! tolerance; where the cost model disagrees with the report, the test pins what the model
//! says and docs/PLANNER.md explains why.

use skymoe_plan::planner::{evaluate, plan_all, uniform_baseline, Plan, SplitChoice};
use skymoe_plan::*;

fn skywork() -> ModelShape {
    ModelShape::preset("skywork-moe-146b").unwrap()
}

/// 1536 sequences of 4096 tokens per step (6.3M tokens; the report does not give its batch).
fn skywork_job() -> Job {
    Job::new(1536 * 4096, 4096)
}

fn layout(text: &str, world: usize) -> Layout {
    LayoutSpec::parse(text).unwrap().resolve(world, 1).unwrap()
}

fn plan(
    model: &ModelShape,
    cluster: &Cluster,
    job: &Job,
    text: &str,
    split: Option<Vec<usize>>,
) -> Plan {
    let choice = SplitChoice {
        pp_layers: split,
        recompute: None,
    };
    evaluate(model, cluster, job, layout(text, cluster.world()), &choice).unwrap()
}

/// A Skywork-MoE-shaped model with 24 layers, the report's pipeline example.
fn skywork_24_layers() -> ModelShape {
    let mut m = skywork();
    m.layers = 24;
    m.moe.as_mut().unwrap().layers = vec![true; 24];
    m.name = "skywork-moe-24-layers".into();
    m
}

#[test]
fn report_pipeline_example_24_layers() {
    let model = skywork_24_layers();
    let job = Job::new(640 * 4096, 4096);
    // Four stages: [6,6,6,6] leaves the LM head and loss (0.6 of a layer here) on the last
    // stage; moving a whole layer would cost more than it saves, and the planner keeps it.
    let four = Cluster::preset("a800-80g", 64).unwrap();
    let best4 = plan(&model, &four, &job, "edp=4,pp=4", None);
    let uniform4 = plan(&model, &four, &job, "edp=4,pp=4", Some(vec![6, 6, 6, 6]));
    assert!(best4.feasible && uniform4.feasible);
    assert!(best4.step_time_s <= uniform4.step_time_s * (1.0 + 1e-9));
    let head_share = uniform4.stages[3].time_s / uniform4.stages[0].time_s - 1.0;
    eprintln!(
        "pp=4: planner {:?} {:.3} s bubble {:.1}% | [6,6,6,6] {:.3} s bubble {:.1}% | last stage {:.1}% slower",
        best4.pp_layers,
        best4.step_time_s,
        100.0 * best4.bubble_fraction,
        uniform4.step_time_s,
        100.0 * uniform4.bubble_fraction,
        100.0 * head_share
    );
    assert!(head_share > 0.05 && head_share < 1.0 / 6.0, "{head_share}");
    // Five stages, the report's [5,5,5,5,4]: the short stage belongs at the end, where the
    // head is. The planner chooses it; the same counts with the short stage first lose.
    let five = Cluster::preset("a800-80g", 80).unwrap();
    let best5 = plan(&model, &five, &job, "edp=4,pp=5", None);
    let first_short = plan(&model, &five, &job, "edp=4,pp=5", Some(vec![4, 5, 5, 5, 5]));
    eprintln!(
        "pp=5: planner {:?} {:.3} s bubble {:.1}% | [4,5,5,5,5] {:.3} s bubble {:.1}%",
        best5.pp_layers,
        best5.step_time_s,
        100.0 * best5.bubble_fraction,
        first_short.step_time_s,
        100.0 * first_short.bubble_fraction
    );
    assert_eq!(best5.pp_layers, vec![5, 5, 5, 5, 4]);
    assert!(best5.bubble_fraction < first_short.bubble_fraction - 0.05);
    let gain = first_short.step_time_s / best5.step_time_s - 1.0;
    assert!(gain > 0.03 && gain < 0.15, "{gain}");
}

#[test]
fn skywork_production_layout_is_feasible_and_near_the_reported_throughput() {
    let sky = skywork();
    let cluster = Cluster::preset("a800-80g", 192).unwrap();
    assert_eq!(cluster.world(), 1536);
    let job = skywork_job();
    let p = plan(&sky, &cluster, &job, "edp=4,pp=12,dp=32,zero=1", None);
    assert!(p.feasible, "{:?}", p.why_infeasible);
    assert_eq!(
        (p.tp, p.ep, p.edp, p.etp, p.pp, p.dp, p.zero),
        (4, 4, 4, 1, 12, 32, 1)
    );
    assert_eq!(p.pp_layers.iter().sum::<usize>(), 52);
    // Reported: 38% MFU, 690 tokens/GPU/s. The report's FLOP count is not given (its MFU and
    // throughput imply 1.7e11 FLOPs per token; ours is 1.4e11), so the two ratios differ.
    let mfu_ratio = p.mfu / 0.38;
    let tok_ratio = p.tokens_per_gpu_s / 690.0;
    eprintln!(
        "Skywork-MoE on 1536 A800: {:?} recompute {:?}, {:.1} GiB, step {:.2} s, bubble {:.1}%, MFU {:.1}% (x{mfu_ratio:.2} of 38%), {:.0} tokens/GPU/s (x{tok_ratio:.2} of 690)",
        p.pp_layers,
        p.recompute_layers,
        p.mem_gib_per_gpu,
        p.step_time_s,
        100.0 * p.bubble_fraction,
        100.0 * p.mfu,
        p.tokens_per_gpu_s
    );
    // Tolerance ±35%: the model has no kernel-launch, load-imbalance or congestion costs.
    assert!((0.65..1.35).contains(&mfu_ratio), "{mfu_ratio}");
    assert!((0.65..1.35).contains(&tok_ratio), "{tok_ratio}");
    // The search finds it among the feasible layouts too.
    let all = plan_all(&sky, &cluster, &job, &[1]).unwrap();
    let rank = all
        .iter()
        .position(|q| (q.tp, q.ep, q.etp, q.pp, q.dp) == (4, 4, 1, 12, 32))
        .unwrap();
    assert!(all[rank].feasible);
    eprintln!(
        "rank {} of {} (best: {} at {:.2} s, {:.1}% faster)",
        rank + 1,
        all.len(),
        all[0].args,
        all[0].step_time_s,
        100.0 * (p.step_time_s / all[0].step_time_s - 1.0)
    );
    // Within 15% of the best layout the model knows.
    assert!(p.step_time_s < 1.15 * all[0].step_time_s);
}

#[test]
fn edp_sends_the_least_all_to_all_at_16_experts_and_stops_fitting_past_32() {
    let cluster = Cluster::preset("a800-80g", 192).unwrap();
    let job = skywork_job();
    let at = |experts: usize, text: &str| {
        let m = skywork().with_experts(experts);
        plan(&m, &cluster, &job, text, None)
    };
    let edp = at(16, "edp=4,pp=12,dp=32");
    let ep = at(16, "tp=4,ep=16,pp=12,dp=32");
    let etp = at(16, "tp=4,etp=4,pp=12,dp=32");
    let volume = |p: &Plan| p.traffic.ep_intra_gib + p.traffic.ep_inter_gib;
    eprintln!(
        "16 experts, dispatch+combine GiB/step/rank (inside node + across nodes): EDP {:.1}+{:.1}, EP16 {:.1}+{:.1}, ETP {:.1}+{:.1}; expert-gradient GiB: EDP {:.1}, EP16 {:.1}, ETP {:.1}; step: EDP {:.2} s, EP16 {:.2} s, ETP {:.2} s",
        edp.traffic.ep_intra_gib, edp.traffic.ep_inter_gib, ep.traffic.ep_intra_gib, ep.traffic.ep_inter_gib,
        etp.traffic.ep_intra_gib, etp.traffic.ep_inter_gib, edp.traffic.expert_dp_gib, ep.traffic.expert_dp_gib,
        etp.traffic.expert_dp_gib, edp.step_time_s, ep.step_time_s, etp.step_time_s
    );
    assert!(volume(&edp) < volume(&ep));
    assert!(volume(&edp) < volume(&etp) / 2.0);
    assert_eq!(edp.traffic.ep_inter_gib, 0.0);
    assert!(ep.traffic.ep_inter_gib > 0.0);
    assert!(edp.step_time_s < etp.step_time_s);
    // EDP replicates experts over DP: E/TP experts per rank. Its expert-gradient traffic
    // grows with E and, past 32 experts of Skywork's size, its weights no longer fit.
    let mut last_fit = 0;
    for experts in [8, 16, 32, 64, 128] {
        let edp = at(experts, "edp=4,pp=12,dp=32");
        let ep = at(
            experts,
            &format!("tp=4,ep={},pp=12,dp=32", experts.min(128)),
        );
        eprintln!(
            "{experts:3} experts: EDP {:5.1} GiB/GPU, expert-gradient {:6.1} GiB, step {:5.2} s | EP{} {:5.1} GiB/GPU, expert-gradient {:5.1} GiB, step {:5.2} s",
            edp.mem_gib_per_gpu, edp.traffic.expert_dp_gib, edp.step_time_s, experts.min(128),
            ep.mem_gib_per_gpu, ep.traffic.expert_dp_gib, ep.step_time_s
        );
        assert!(ep.feasible);
        if edp.feasible {
            last_fit = experts;
        }
        assert!(edp.traffic.expert_dp_gib >= ep.traffic.expert_dp_gib);
    }
    assert_eq!(last_fit, 32);
}

#[test]
fn non_uniform_stages_at_skywork_scale() {
    let sky = skywork();
    let job = skywork_job();
    let mut best_gain: f64 = 0.0;
    for (text, nodes) in [
        ("edp=4,pp=12", 192),
        ("edp=4,pp=8", 192),
        ("edp=4,pp=13", 208),
    ] {
        for mem in [80.0, 64.0, 48.0, 40.0] {
            let mut cluster = Cluster::preset("a800-80g", nodes).unwrap();
            cluster.mem_gib = mem;
            let lay = layout(text, cluster.world());
            let ours = evaluate(&sky, &cluster, &job, lay, &SplitChoice::default()).unwrap();
            let uniform = uniform_baseline(&sky, &cluster, &job, lay).unwrap();
            if !ours.feasible {
                assert!(!uniform.feasible);
                continue;
            }
            let gain = if uniform.feasible {
                uniform.step_time_s / ours.step_time_s - 1.0
            } else {
                f64::NAN
            };
            eprintln!(
                "{text} {mem} GiB: planner {:?} recompute {:?} {:.2} s | uniform {:?} recompute {:?} {:.2} s{} | gain {:.1}%",
                ours.pp_layers, ours.recompute_layers, ours.step_time_s,
                uniform.pp_layers, uniform.recompute_layers, uniform.step_time_s,
                if uniform.feasible { "" } else { " (does not fit)" },
                100.0 * gain
            );
            assert!(ours.step_time_s <= uniform.step_time_s * (1.0 + 1e-9));
            if gain.is_finite() {
                best_gain = best_gain.max(gain);
            }
        }
    }
    eprintln!(
        "largest gain of the non-uniform split: {:.1}%",
        100.0 * best_gain
    );
    // Report: up to ~10%. Ours: a few percent, when memory forces recomputation (docs/PLANNER.md).
    assert!(best_gain > 0.02 && best_gain < 0.15, "{best_gain}");
}

//! Plans as a table for people.

use crate::planner::Plan;

fn join(v: &[usize]) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// A fixed-width table of plans: layout, stages, memory, time breakdown, bubble, MFU; then the
/// model's notes (see [`crate::ModelShape::notes`]), one `note:` line each.
pub fn render(plans: &[Plan]) -> String {
    let mut out = String::new();
    out += &format!(
        "{:>3} {:<7} {:>3} {:>3} {:>3} {:>3} {:>4} {:>4} {:<22} {:<16} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>8}\n",
        "#", "experts", "tp", "ep", "etp", "pp", "dp", "zero", "pp_layers", "recompute", "mem/GiB",
        "step/s", "compute", "recomp", "tp+ep", "pp+dp", "optim", "bubble", "bub%", "MFU%", "tok/GPU/s"
    );
    for (i, p) in plans.iter().enumerate() {
        let b = &p.breakdown;
        let mark = if p.feasible { "" } else { " (does not fit)" };
        out += &format!(
            "{:>3} {:<7} {:>3} {:>3} {:>3} {:>3} {:>4} {:>4} {:<22} {:<16} {:>7.1} {:>8.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>6.1} {:>6.1} {:>8.0}{mark}\n",
            i + 1,
            p.strategy,
            p.tp,
            p.ep,
            p.etp,
            p.pp,
            p.dp,
            p.zero,
            join(&p.pp_layers),
            join(&p.recompute_layers),
            p.mem_gib_per_gpu,
            p.step_time_s,
            b.compute_s,
            b.recompute_s,
            b.tp_comm_s + b.ep_comm_s,
            b.pp_comm_s + b.dp_comm_s,
            b.optimizer_s,
            b.bubble_s,
            100.0 * p.bubble_fraction,
            100.0 * p.mfu,
            p.tokens_per_gpu_s,
        );
    }
    if let Some(p) = plans.first() {
        for n in &p.notes {
            out += &format!("note: {n}\n");
        }
    }
    out
}

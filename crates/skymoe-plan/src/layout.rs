//! Parallel layouts: the degrees of tensor, expert, pipeline and data parallelism.
//!
//! Ranks are ordered as in Megatron-Core (`tp` fastest, then `dp`, then `pp`); the expert side
//! of the same ranks is ordered `etp`, then `ep`, then expert-data-parallel. Hence a group of
//! `n` ranks with stride `s` stays inside a node when `n·s ≤ gpus_per_node`.

use serde::Serialize;

use crate::error::{PlanError, Result};
use crate::model::ModelShape;

/// A complete layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Layout {
    /// Tensor-parallel degree of attention (and of dense FFNs).
    pub tp: usize,
    /// Expert-parallel degree: experts are spread over `ep` ranks.
    pub ep: usize,
    /// Expert-tensor-parallel degree: every expert is split over `etp` ranks.
    pub etp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Data-parallel replicas of the attention (non-expert) weights.
    pub dp: usize,
    /// ZeRO stage (0 none, 1 optimiser state, 2 + gradients, 3 + weights sharded over DP).
    pub zero: u8,
}

/// How the experts are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Strategy {
    /// Experts replicated on every rank (dense model, or no expert parallelism).
    Replicated,
    /// Skywork's Expert Data Parallel: EP group = TP group, whole experts.
    Edp,
    /// Megatron expert parallelism with whole experts, the EP group not the TP group.
    Ep,
    /// Every expert split over the TP group.
    Etp,
    /// Experts both spread (EP) and split (ETP).
    EpEtp,
}

impl Strategy {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Replicated => "-",
            Self::Edp => "EDP",
            Self::Ep => "EP",
            Self::Etp => "ETP",
            Self::EpEtp => "EP+ETP",
        }
    }
}

/// A layout as a user writes it: `tp=4,ep=4,pp=12,dp=32,zero=1`, `edp=4,pp=12`, ... Missing
/// degrees are filled in by [`LayoutSpec::resolve`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayoutSpec {
    /// `tp=`
    pub tp: Option<usize>,
    /// `ep=`
    pub ep: Option<usize>,
    /// `edp=` (TP = EP = N, experts whole)
    pub edp: Option<usize>,
    /// `etp=`
    pub etp: Option<usize>,
    /// `pp=`
    pub pp: Option<usize>,
    /// `dp=`
    pub dp: Option<usize>,
    /// `zero=`
    pub zero: Option<u8>,
}

impl LayoutSpec {
    /// Parse `key=value` pairs separated by commas; keys tp, ep, edp, etp, pp, dp, zero.
    pub fn parse(text: &str) -> Result<Self> {
        let mut spec = LayoutSpec::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                PlanError::Layout(format!("`{part}` is not key=value (e.g. tp=4)"))
            })?;
            let n: usize = value.trim().parse().map_err(|_| {
                PlanError::Layout(format!("`{part}`: `{value}` is not a whole number"))
            })?;
            if n == 0 && key.trim() != "zero" {
                return Err(PlanError::Layout(format!(
                    "`{part}`: a degree must be at least 1"
                )));
            }
            let slot = match key.trim() {
                "tp" => &mut spec.tp,
                "ep" => &mut spec.ep,
                "edp" => &mut spec.edp,
                "etp" => &mut spec.etp,
                "pp" => &mut spec.pp,
                "dp" => &mut spec.dp,
                "zero" => {
                    if n > 3 {
                        return Err(PlanError::Layout(format!(
                            "`{part}`: ZeRO stages are 0 to 3"
                        )));
                    }
                    spec.zero = Some(n as u8);
                    continue;
                }
                other => {
                    return Err(PlanError::Layout(format!(
                        "unknown key `{other}` (expected tp, ep, edp, etp, pp, dp, zero)"
                    )))
                }
            };
            if slot.replace(n).is_some() {
                return Err(PlanError::Layout(format!("`{key}` is given twice")));
            }
        }
        Ok(spec)
    }

    /// Fill in what was left out for `world` ranks: `edp=N` means tp = ep = N with whole
    /// experts; `etp` defaults to `tp` unless `edp` or `ep` > 1 is given (whole experts);
    /// `dp` is what the world size leaves; `zero` defaults to `default_zero`.
    pub fn resolve(&self, world: usize, default_zero: u8) -> Result<Layout> {
        let (tp, ep, etp) = match self.edp {
            Some(n) => {
                if self.tp.is_some_and(|t| t != n) || self.ep.is_some_and(|e| e != n) {
                    return Err(PlanError::Layout(format!(
                        "edp={n} means tp = ep = {n}; it conflicts with the tp/ep given"
                    )));
                }
                if self.etp.is_some_and(|e| e != 1) {
                    return Err(PlanError::Layout(format!(
                        "edp={n} keeps experts whole (etp=1); etp={} conflicts",
                        self.etp.unwrap_or(1)
                    )));
                }
                (n, n, 1)
            }
            None => {
                let tp = self.tp.unwrap_or(1);
                let ep = self.ep.unwrap_or(1);
                let etp = self.etp.unwrap_or(if ep > 1 { 1 } else { tp });
                (tp, ep, etp)
            }
        };
        let pp = self.pp.unwrap_or(1);
        let dp = match self.dp {
            Some(d) => d,
            None => {
                if !world.is_multiple_of(tp * pp) {
                    return Err(PlanError::Layout(format!(
                        "tp={tp} × pp={pp} = {} does not divide the {world} ranks",
                        tp * pp
                    )));
                }
                world / (tp * pp)
            }
        };
        let layout = Layout {
            tp,
            ep,
            etp,
            pp,
            dp,
            zero: self.zero.unwrap_or(default_zero),
        };
        if layout.world() != world {
            return Err(PlanError::Layout(format!(
                "tp={tp} × pp={pp} × dp={dp} = {} ranks, but there are {world}",
                layout.world()
            )));
        }
        Ok(layout)
    }
}

impl Layout {
    /// Ranks the layout needs.
    pub fn world(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// Data-parallel replicas of each expert: `tp·dp / (ep·etp)`.
    pub fn expert_dp(&self) -> usize {
        (self.tp * self.dp) / (self.ep * self.etp).max(1)
    }

    /// How experts are placed.
    pub fn strategy(&self) -> Strategy {
        match (self.ep > 1, self.etp > 1) {
            (false, false) => Strategy::Replicated,
            (true, false) if self.ep == self.tp => Strategy::Edp,
            (true, false) => Strategy::Ep,
            (false, true) => Strategy::Etp,
            (true, true) => Strategy::EpEtp,
        }
    }

    /// The EDP degree: N when this is EDP with TP = EP = N, else 1.
    pub fn edp(&self) -> usize {
        if self.strategy() == Strategy::Edp {
            self.tp
        } else {
            1
        }
    }

    /// The layout as `skymoe train --parallel` takes it.
    pub fn to_arg(&self) -> String {
        let head = if self.strategy() == Strategy::Edp {
            format!("edp={}", self.tp)
        } else {
            let mut s = format!("tp={}", self.tp);
            if self.ep > 1 {
                s += &format!(",ep={}", self.ep);
            }
            if self.etp != (if self.ep > 1 { 1 } else { self.tp }) {
                s += &format!(",etp={}", self.etp);
            }
            s
        };
        format!("{head},pp={},dp={},zero={}", self.pp, self.dp, self.zero)
    }

    /// Check the layout against the model; the error names the conflict.
    pub fn check(&self, model: &ModelShape) -> Result<()> {
        let bad = |m: String| Err(PlanError::Layout(m));
        if self.zero > 3 {
            return bad(format!("zero={}: ZeRO stages are 0 to 3", self.zero));
        }
        if !model.heads.is_multiple_of(self.tp) {
            return bad(format!(
                "tp={} does not divide the {} attention heads (non-uniform head splits are for inference only)",
                self.tp, model.heads
            ));
        }
        if !model.kv_heads.is_multiple_of(self.tp) {
            return bad(format!(
                "tp={} does not divide the {} key/value heads",
                self.tp, model.kv_heads
            ));
        }
        if self.pp > model.layers {
            return bad(format!(
                "pp={} stages for {} layers: every stage needs a layer",
                self.pp, model.layers
            ));
        }
        match &model.moe {
            None => {
                if self.ep > 1 || (self.etp > 1 && self.etp != self.tp) {
                    return bad(format!(
                        "ep={} / etp={}: the model has no experts",
                        self.ep, self.etp
                    ));
                }
                if !model.dense_ffn.is_multiple_of(self.tp) {
                    return bad(format!(
                        "tp={} does not divide the FFN width {}",
                        self.tp, model.dense_ffn
                    ));
                }
            }
            Some(m) => {
                if self.ep > m.experts {
                    return bad(format!("ep={} exceeds the {} experts", self.ep, m.experts));
                }
                if m.experts % self.ep != 0 {
                    return bad(format!(
                        "ep={} does not divide the {} experts",
                        self.ep, m.experts
                    ));
                }
                if m.expert_ffn % self.etp != 0 {
                    return bad(format!(
                        "etp={} does not divide the expert FFN width {}",
                        self.etp, m.expert_ffn
                    ));
                }
                if !(self.tp * self.dp).is_multiple_of(self.ep * self.etp) {
                    return bad(format!(
                        "ep={} × etp={} = {} does not divide tp × dp = {} (the ranks of one pipeline stage)",
                        self.ep,
                        self.etp,
                        self.ep * self.etp,
                        self.tp * self.dp
                    ));
                }
                let dense_layers = (0..model.layers).any(|l| !model.is_moe_layer(l));
                if dense_layers && !model.dense_ffn.is_multiple_of(self.tp) {
                    return bad(format!(
                        "tp={} does not divide the dense FFN width {}",
                        self.tp, model.dense_ffn
                    ));
                }
                if m.shared_ffn > 0 && m.shared_ffn % self.tp != 0 {
                    return bad(format!(
                        "tp={} does not divide the shared expert width {}",
                        self.tp, m.shared_ffn
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Check a per-stage layer list (`--pp-layers 5,7,7,5`) against the layout and the model.
pub fn check_stage_layers(stage_layers: &[usize], pp: usize, layers: usize) -> Result<()> {
    if stage_layers.len() != pp {
        return Err(PlanError::Layout(format!(
            "{} stage sizes given for pp={pp}",
            stage_layers.len()
        )));
    }
    if let Some(i) = stage_layers.iter().position(|&n| n == 0) {
        return Err(PlanError::Layout(format!("stage {i} has no layers")));
    }
    let sum: usize = stage_layers.iter().sum();
    if sum != layers {
        return Err(PlanError::Layout(format!(
            "the stage sizes add up to {sum} layers; the model has {layers}"
        )));
    }
    Ok(())
}

/// Parse a comma-separated list of counts (`5,7,7,5`).
pub fn parse_counts(text: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| PlanError::Layout(format!("`{p}` in `{text}` is not a whole number")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edp_means_tp_equals_ep_with_whole_experts() {
        let l = LayoutSpec::parse("edp=4,pp=12")
            .unwrap()
            .resolve(1536, 1)
            .unwrap();
        assert_eq!(
            (l.tp, l.ep, l.etp, l.pp, l.dp, l.zero),
            (4, 4, 1, 12, 32, 1)
        );
        assert_eq!(l.strategy(), Strategy::Edp);
        assert_eq!(l.expert_dp(), 32);
        assert_eq!(l.to_arg(), "edp=4,pp=12,dp=32,zero=1");
        let again = LayoutSpec::parse(&l.to_arg())
            .unwrap()
            .resolve(1536, 0)
            .unwrap();
        assert_eq!(again, l);
    }

    #[test]
    fn tp_alone_splits_experts_and_ep_keeps_them_whole() {
        let l = LayoutSpec::parse("tp=4").unwrap().resolve(8, 0).unwrap();
        assert_eq!((l.ep, l.etp, l.dp), (1, 4, 2));
        assert_eq!(l.strategy(), Strategy::Etp);
        let l = LayoutSpec::parse("tp=2,ep=4")
            .unwrap()
            .resolve(8, 0)
            .unwrap();
        assert_eq!((l.ep, l.etp, l.expert_dp()), (4, 1, 2));
        assert_eq!(l.strategy(), Strategy::Ep);
        for l in [
            l,
            LayoutSpec::parse("tp=2,ep=2,etp=2")
                .unwrap()
                .resolve(8, 0)
                .unwrap(),
        ] {
            assert_eq!(
                LayoutSpec::parse(&l.to_arg())
                    .unwrap()
                    .resolve(8, 0)
                    .unwrap(),
                l
            );
        }
    }

    #[test]
    fn bad_layout_text_is_explained() {
        for (text, needle) in [
            ("tp4", "key=value"),
            ("tp=x", "whole number"),
            ("tp=0", "at least 1"),
            ("zero=4", "0 to 3"),
            ("foo=2", "unknown key"),
            ("tp=2,tp=4", "twice"),
        ] {
            let e = LayoutSpec::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let e = LayoutSpec::parse("edp=4,tp=2")
            .unwrap()
            .resolve(8, 0)
            .unwrap_err();
        assert!(e.to_string().contains("conflicts"), "{e}");
        let e = LayoutSpec::parse("tp=4,pp=4,dp=4")
            .unwrap()
            .resolve(32, 0)
            .unwrap_err();
        assert!(e.to_string().contains("64 ranks, but there are 32"), "{e}");
        let e = LayoutSpec::parse("tp=3")
            .unwrap()
            .resolve(8, 0)
            .unwrap_err();
        assert!(e.to_string().contains("does not divide the 8 ranks"), "{e}");
    }

    #[test]
    fn layouts_that_do_not_fit_the_model_name_the_conflict() {
        let sky = ModelShape::preset("skywork-moe-146b").unwrap();
        let check = |text: &str, world: usize| {
            LayoutSpec::parse(text)
                .unwrap()
                .resolve(world, 0)
                .unwrap()
                .check(&sky)
                .unwrap_err()
                .to_string()
        };
        assert!(check("tp=8", 8).contains("36 attention heads"));
        assert!(check("tp=1,ep=32,dp=32", 32).contains("exceeds the 16 experts"));
        assert!(check("tp=1,ep=6,dp=6", 6).contains("does not divide the 16 experts"));
        assert!(check("tp=2,ep=8,dp=2", 4).contains("does not divide tp × dp = 4"));
        assert!(check("pp=64", 64).contains("every stage needs a layer"));
    }

    #[test]
    fn stage_lists_are_checked() {
        assert!(check_stage_layers(&[5, 7, 7, 5], 4, 24).is_ok());
        assert!(check_stage_layers(&[6, 6, 6], 4, 24).is_err());
        assert!(check_stage_layers(&[6, 6, 6, 5], 4, 24)
            .unwrap_err()
            .to_string()
            .contains("23 layers"));
        assert!(check_stage_layers(&[12, 12, 0, 0], 4, 24).is_err());
        assert_eq!(parse_counts("5, 7,7,5").unwrap(), vec![5, 7, 7, 5]);
        assert!(parse_counts("5,x").is_err());
    }
}

//! The device mesh: which ranks form each group of a parallel layout.
//!
//! Ranks are ordered as in Megatron-Core: `tp` fastest, then `dp`, then `pp`. Attention
//! groups are laid out as [pp, dp, tp]; the expert side of each stage's `tp·dp` ranks as
//! [expert-dp, ep, etp]. Under EDP (`ep = tp`, `etp = 1`) every EP group is exactly a TP
//! group, so the token all-to-all stays inside it.

use skymoe_plan::{Layout, ModelShape, PlanError};

use crate::comm::{Communicator, Result as CommResult};

/// The groups of one rank in a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// The layout.
    pub layout: Layout,
    /// This rank.
    pub rank: usize,
}

/// The kinds of groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    /// Tensor parallel (attention).
    Tp,
    /// Data parallel of the non-expert weights.
    Dp,
    /// Pipeline: one rank per stage.
    Pp,
    /// Expert parallel.
    Ep,
    /// Expert tensor parallel.
    Etp,
    /// Data parallel of the expert weights.
    ExpertDp,
    /// Every rank of one model replica (all stages and TP ranks with the same DP index).
    ModelParallel,
    /// The first and the last stage's ranks with the same DP and TP index (a tied embedding
    /// lives on both); any other rank is alone in its group.
    Embedding,
}

/// Every group kind.
pub const GROUP_KINDS: [GroupKind; 8] = [
    GroupKind::Tp,
    GroupKind::Dp,
    GroupKind::Pp,
    GroupKind::Ep,
    GroupKind::Etp,
    GroupKind::ExpertDp,
    GroupKind::ModelParallel,
    GroupKind::Embedding,
];

impl Mesh {
    /// The mesh of `rank` among `world` ranks; the layout must use exactly `world` ranks and
    /// fit the model (the error names the conflict).
    pub fn new(
        world: usize,
        rank: usize,
        layout: Layout,
        model: &ModelShape,
    ) -> Result<Self, PlanError> {
        if layout.world() != world {
            return Err(PlanError::Layout(format!(
                "tp={} × pp={} × dp={} = {} ranks, but {world} processes were started",
                layout.tp,
                layout.pp,
                layout.dp,
                layout.world()
            )));
        }
        layout.check(model)?;
        if rank >= world {
            return Err(PlanError::Layout(format!("rank {rank} of {world}")));
        }
        Ok(Mesh { layout, rank })
    }

    /// The mesh of `rank` among `world` ranks before the model is known (the layout is
    /// checked against the model later, with [`Mesh::new`]).
    pub fn for_layout(world: usize, rank: usize, layout: Layout) -> Result<Self, PlanError> {
        if layout.world() != world || rank >= world {
            return Err(PlanError::Layout(format!(
                "tp={} × pp={} × dp={} = {} ranks, but {world} processes were started",
                layout.tp,
                layout.pp,
                layout.dp,
                layout.world()
            )));
        }
        Ok(Mesh { layout, rank })
    }

    /// A communicator for this rank's group of `kind`, split from `world` (every rank must
    /// ask for the same kinds in the same order).
    pub fn communicator(
        &self,
        kind: GroupKind,
        world: &dyn Communicator,
    ) -> CommResult<Box<dyn Communicator>> {
        let (ranks, color) = self.group(kind);
        let key = ranks.iter().position(|&r| r == self.rank).unwrap_or(0);
        world.split(color, key)
    }

    /// (pp, dp, tp) coordinates of a rank.
    pub fn coords(&self, rank: usize) -> (usize, usize, usize) {
        let l = &self.layout;
        (rank / (l.tp * l.dp), (rank / l.tp) % l.dp, rank % l.tp)
    }

    /// (expert-dp, ep, etp) coordinates of a rank inside its stage.
    pub fn expert_coords(&self, rank: usize) -> (usize, usize, usize) {
        let l = &self.layout;
        let local = rank % (l.tp * l.dp);
        (
            local / (l.etp * l.ep),
            (local / l.etp) % l.ep,
            local % l.etp,
        )
    }

    /// The ranks of this rank's group of `kind`, in group-rank order, and the group's index
    /// among the groups of that kind (a colour for [`Communicator::split`]).
    pub fn group(&self, kind: GroupKind) -> (Vec<usize>, usize) {
        let l = &self.layout;
        let (pp, dp, tp) = self.coords(self.rank);
        let stage = l.tp * l.dp;
        let base = pp * stage;
        let (edp, ep, etp) = self.expert_coords(self.rank);
        match kind {
            GroupKind::Tp => (
                (0..l.tp).map(|t| base + dp * l.tp + t).collect(),
                pp * l.dp + dp,
            ),
            GroupKind::Dp => (
                (0..l.dp).map(|d| base + d * l.tp + tp).collect(),
                pp * l.tp + tp,
            ),
            GroupKind::Pp => (
                (0..l.pp).map(|p| p * stage + dp * l.tp + tp).collect(),
                dp * l.tp + tp,
            ),
            GroupKind::Ep => (
                (0..l.ep)
                    .map(|e| base + edp * l.etp * l.ep + e * l.etp + etp)
                    .collect(),
                (pp * l.expert_dp() + edp) * l.etp + etp,
            ),
            GroupKind::Etp => (
                (0..l.etp)
                    .map(|t| base + edp * l.etp * l.ep + ep * l.etp + t)
                    .collect(),
                (pp * l.expert_dp() + edp) * l.ep + ep,
            ),
            GroupKind::ModelParallel => (
                (0..l.pp)
                    .flat_map(|p| (0..l.tp).map(move |t| p * stage + dp * l.tp + t))
                    .collect(),
                dp,
            ),
            GroupKind::Embedding => {
                if l.pp > 1 && (pp == 0 || pp + 1 == l.pp) {
                    (
                        vec![dp * l.tp + tp, (l.pp - 1) * stage + dp * l.tp + tp],
                        dp * l.tp + tp,
                    )
                } else {
                    (vec![self.rank], stage + self.rank)
                }
            }
            GroupKind::ExpertDp => (
                (0..l.expert_dp())
                    .map(|d| base + d * l.etp * l.ep + ep * l.etp + etp)
                    .collect(),
                (pp * l.ep + ep) * l.etp + etp,
            ),
        }
    }

    /// Communicators for every group of this rank, split from `world`. Every rank must call
    /// this, in the same order.
    pub fn communicators(&self, world: &dyn Communicator) -> CommResult<MeshComms> {
        let make = |kind| {
            let (ranks, color) = self.group(kind);
            let key = ranks.iter().position(|&r| r == self.rank).unwrap_or(0);
            world.split(color, key)
        };
        Ok(MeshComms {
            tp: make(GroupKind::Tp)?,
            dp: make(GroupKind::Dp)?,
            pp: make(GroupKind::Pp)?,
            ep: make(GroupKind::Ep)?,
            etp: make(GroupKind::Etp)?,
            expert_dp: make(GroupKind::ExpertDp)?,
        })
    }
}

/// One communicator per group of a rank.
pub struct MeshComms {
    /// Tensor parallel.
    pub tp: Box<dyn Communicator>,
    /// Data parallel (non-expert weights).
    pub dp: Box<dyn Communicator>,
    /// Pipeline.
    pub pp: Box<dyn Communicator>,
    /// Expert parallel.
    pub ep: Box<dyn Communicator>,
    /// Expert tensor parallel.
    pub etp: Box<dyn Communicator>,
    /// Data parallel (expert weights).
    pub expert_dp: Box<dyn Communicator>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymoe_plan::LayoutSpec;

    fn model() -> ModelShape {
        ModelShape::preset("skywork-moe-146b").unwrap()
    }

    fn meshes(text: &str, world: usize) -> Vec<Mesh> {
        let layout = LayoutSpec::parse(text).unwrap().resolve(world, 0).unwrap();
        (0..world)
            .map(|r| Mesh::new(world, r, layout, &model()).unwrap())
            .collect()
    }

    /// Every kind of group partitions the world; groups agree between their members; the
    /// colours of different groups differ.
    fn check_partition(ms: &[Mesh]) {
        let world = ms.len();
        for kind in GROUP_KINDS {
            let mut seen = vec![0; world];
            let mut colors = std::collections::HashMap::new();
            for m in ms {
                let (ranks, color) = m.group(kind);
                assert!(
                    ranks.contains(&m.rank),
                    "{kind:?}: rank {} not in its group",
                    m.rank
                );
                for &r in &ranks {
                    assert_eq!(ms[r].group(kind), (ranks.clone(), color), "{kind:?}");
                }
                seen[m.rank] += 1;
                if let Some(prev) = colors.insert(color, ranks.clone()) {
                    assert_eq!(prev, ranks, "{kind:?}: colour {color} names two groups");
                }
            }
            assert!(seen.iter().all(|&s| s == 1));
        }
    }

    #[test]
    fn groups_follow_megatron_order() {
        let ms = meshes("tp=2,ep=2,pp=2,dp=2", 8);
        check_partition(&ms);
        let m = &ms[5]; // pp 1, dp 0, tp 1
        assert_eq!(m.coords(5), (1, 0, 1));
        assert_eq!(m.group(GroupKind::Tp).0, vec![4, 5]);
        assert_eq!(m.group(GroupKind::Dp).0, vec![5, 7]);
        assert_eq!(m.group(GroupKind::Pp).0, vec![1, 5]);
        // ep=2 with etp=1 over tp·dp = 4 ranks of the stage: consecutive ranks.
        assert_eq!(m.group(GroupKind::Ep).0, vec![4, 5]);
        assert_eq!(m.group(GroupKind::ExpertDp).0, vec![5, 7]);
    }

    #[test]
    fn edp_expert_groups_are_the_tp_groups() {
        for (text, world) in [
            ("edp=4,pp=2,dp=2", 16),
            ("edp=2,dp=2", 4),
            ("edp=4,pp=3", 12),
        ] {
            let ms = meshes(text, world);
            check_partition(&ms);
            for m in &ms {
                assert_eq!(m.group(GroupKind::Ep).0, m.group(GroupKind::Tp).0, "{text}");
                assert_eq!(
                    m.group(GroupKind::ExpertDp).0,
                    m.group(GroupKind::Dp).0,
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn ep_spans_data_parallel_ranks_and_etp_splits_inside_tp() {
        let ms = meshes("tp=2,ep=4,dp=4", 8);
        check_partition(&ms);
        assert_eq!(ms[0].group(GroupKind::Ep).0, vec![0, 1, 2, 3]);
        assert_eq!(ms[0].group(GroupKind::ExpertDp).0, vec![0, 4]);
        let ms = meshes("tp=4,dp=2", 8);
        check_partition(&ms);
        assert_eq!(ms[6].group(GroupKind::Etp).0, vec![4, 5, 6, 7]);
        assert_eq!(ms[6].group(GroupKind::Etp).0, ms[6].group(GroupKind::Tp).0);
    }

    #[test]
    fn layouts_that_do_not_fit_are_clear_errors() {
        let layout = LayoutSpec::parse("tp=2,dp=2")
            .unwrap()
            .resolve(4, 0)
            .unwrap();
        let e = Mesh::new(8, 0, layout, &model()).unwrap_err().to_string();
        assert!(e.contains("4 ranks, but 8 processes were started"), "{e}");
        let layout = LayoutSpec::parse("tp=1,ep=32,dp=32")
            .unwrap()
            .resolve(32, 0)
            .unwrap();
        let e = Mesh::new(32, 0, layout, &model()).unwrap_err().to_string();
        assert!(e.contains("exceeds the 16 experts"), "{e}");
    }
}

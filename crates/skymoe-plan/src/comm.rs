//! Time of collectives on a group of ranks, from the cluster's bandwidths.
//!
//! A group of `n` ranks whose members are `stride` ranks apart (see the rank order in
//! [`crate::layout`]) lies inside one node when `n·stride ≤ gpus_per_node`. Ring collectives
//! (all-gather, reduce-scatter, all-reduce) run at the intra-node bandwidth then, else at the
//! inter-node bandwidth of one accelerator, which bounds the ring. An all-to-all sends each
//! peer its share: the shares to peers in the same node go at the intra-node bandwidth, the
//! others at the inter-node one, concurrently.

use crate::cluster::Cluster;

/// A group of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    /// Members.
    pub size: usize,
    /// Rank distance between consecutive members.
    pub stride: usize,
}

impl Group {
    /// A group of `size` members `stride` apart.
    pub fn new(size: usize, stride: usize) -> Self {
        Group {
            size,
            stride: stride.max(1),
        }
    }

    /// Members of the group inside one node (at least 1).
    pub fn members_per_node(&self, gpus_per_node: usize) -> usize {
        if self.stride >= gpus_per_node {
            1
        } else {
            (gpus_per_node / self.stride).clamp(1, self.size)
        }
    }

    /// Whether the whole group is inside one node.
    pub fn intra_node(&self, gpus_per_node: usize) -> bool {
        self.size * self.stride <= gpus_per_node
    }
}

/// Bytes a collective moves and the seconds it takes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Transfer {
    /// Bytes sent by one rank over links inside its node.
    pub intra_bytes: f64,
    /// Bytes sent by one rank to other nodes.
    pub inter_bytes: f64,
    /// Seconds.
    pub seconds: f64,
}

impl std::ops::Add for Transfer {
    type Output = Transfer;
    fn add(self, o: Transfer) -> Transfer {
        Transfer {
            intra_bytes: self.intra_bytes + o.intra_bytes,
            inter_bytes: self.inter_bytes + o.inter_bytes,
            seconds: self.seconds + o.seconds,
        }
    }
}

impl std::ops::AddAssign for Transfer {
    fn add_assign(&mut self, o: Transfer) {
        *self = *self + o;
    }
}

impl std::ops::Mul<f64> for Transfer {
    type Output = Transfer;
    fn mul(self, k: f64) -> Transfer {
        Transfer {
            intra_bytes: self.intra_bytes * k,
            inter_bytes: self.inter_bytes * k,
            seconds: self.seconds * k,
        }
    }
}

/// Cost of collectives on one cluster.
#[derive(Debug, Clone, Copy)]
pub struct Network<'a> {
    /// The cluster.
    pub cluster: &'a Cluster,
}

impl Network<'_> {
    /// One ring pass (an all-gather or a reduce-scatter) over a tensor of `full_bytes`: each
    /// rank sends `(n-1)/n` of it.
    pub fn ring_pass(&self, group: Group, full_bytes: f64) -> Transfer {
        if group.size <= 1 || full_bytes <= 0.0 {
            return Transfer::default();
        }
        let n = group.size as f64;
        let bytes = (n - 1.0) / n * full_bytes;
        let c = self.cluster;
        if group.intra_node(c.gpus_per_node) {
            Transfer {
                intra_bytes: bytes,
                inter_bytes: 0.0,
                seconds: bytes / (c.intra_gbps * 1e9) + (n - 1.0) * c.intra_latency_us * 1e-6,
            }
        } else {
            Transfer {
                intra_bytes: 0.0,
                inter_bytes: bytes,
                seconds: bytes / (c.inter_gbps * 1e9) + (n - 1.0) * c.inter_latency_us * 1e-6,
            }
        }
    }

    /// An all-reduce: a reduce-scatter then an all-gather.
    pub fn all_reduce(&self, group: Group, full_bytes: f64) -> Transfer {
        self.ring_pass(group, full_bytes) * 2.0
    }

    /// An all-to-all in which every rank holds `bytes_per_rank` spread evenly over the group's
    /// members (itself included: that share does not move).
    pub fn all_to_all(&self, group: Group, bytes_per_rank: f64) -> Transfer {
        if group.size <= 1 || bytes_per_rank <= 0.0 {
            return Transfer::default();
        }
        let c = self.cluster;
        let n = group.size as f64;
        let local = group.members_per_node(c.gpus_per_node) as f64;
        let intra = bytes_per_rank * (local - 1.0) / n;
        let inter = bytes_per_rank * (n - local) / n;
        let latency = if inter > 0.0 {
            c.inter_latency_us
        } else {
            c.intra_latency_us
        };
        Transfer {
            intra_bytes: intra,
            inter_bytes: inter,
            seconds: (intra / (c.intra_gbps * 1e9)).max(inter / (c.inter_gbps * 1e9))
                + latency * 1e-6,
        }
    }

    /// A point-to-point message between ranks `distance` apart.
    pub fn send(&self, distance: usize, bytes: f64) -> Transfer {
        if bytes <= 0.0 {
            return Transfer::default();
        }
        let c = self.cluster;
        if distance < c.gpus_per_node && c.gpus_per_node.is_multiple_of(distance.max(1)) {
            Transfer {
                intra_bytes: bytes,
                inter_bytes: 0.0,
                seconds: bytes / (c.intra_gbps * 1e9) + c.intra_latency_us * 1e-6,
            }
        } else {
            Transfer {
                intra_bytes: 0.0,
                inter_bytes: bytes,
                seconds: bytes / (c.inter_gbps * 1e9) + c.inter_latency_us * 1e-6,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_inside_a_node_use_the_fast_links() {
        let c = Cluster::preset("a800-80g", 4).unwrap();
        let net = Network { cluster: &c };
        let gib = 1024.0 * 1024.0 * 1024.0;
        let inside = net.ring_pass(Group::new(4, 1), gib);
        let across = net.ring_pass(Group::new(4, 8), gib);
        assert_eq!(inside.inter_bytes, 0.0);
        assert_eq!(across.intra_bytes, 0.0);
        assert!((inside.intra_bytes - 0.75 * gib).abs() < 1.0);
        assert!(across.seconds > 5.0 * inside.seconds);
        // 16 ranks, stride 1, 8 per node: 7 of 16 shares stay in the node, 8 leave it.
        let a2a = net.all_to_all(Group::new(16, 1), 16.0);
        assert_eq!((a2a.intra_bytes, a2a.inter_bytes), (7.0, 8.0));
        assert_eq!(net.all_to_all(Group::new(1, 1), 16.0).seconds, 0.0);
    }
}

//! Activation recomputation (checkpointing) of whole decoder layers: a recomputed layer keeps
//! only its input; its backward runs the layer's forward again, with a graph, and
//! backpropagates through it. Parameter gradients of recomputed layers are collected here
//! (the outer backward pass only sees the layer's input), for the trainer to add in.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, Var};

use crate::layers::block::DecoderLayer;
use crate::layers::rotary::RotaryEmbedding;
use crate::layers::router::Routing;

/// The auxiliary objective of a layer's routing (scaled as the trainer scales its loss), added
/// to the recomputed backward so that the router gets the auxiliary losses' gradients.
pub type AuxObjective =
    dyn Fn(usize, &Routing) -> candle_core::Result<Option<Tensor>> + Send + Sync;

/// Which decoder layers are recomputed, and what their backward passes found.
#[derive(Default)]
pub struct Recompute {
    /// Decoder layers (model indices) whose activations are recomputed.
    pub layers: HashSet<usize>,
    /// Each recomputed layer's parameters, by checkpoint name.
    pub params: HashMap<usize, Vec<(String, Tensor)>>,
    /// Gradients of those parameters from the recomputed backward passes, summed.
    pub grads: Mutex<BTreeMap<String, Tensor>>,
    /// The routing each recomputed layer produced in its last forward.
    pub routings: Mutex<HashMap<usize, Routing>>,
    /// The auxiliary objective, set by the trainer for each step.
    pub aux: Mutex<Option<Arc<AuxObjective>>>,
}

impl std::fmt::Debug for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recompute {{ layers: {:?} }}", self.layers)
    }
}

impl Recompute {
    /// Take the parameter gradients collected so far.
    pub fn take_grads(&self) -> BTreeMap<String, Tensor> {
        self.grads
            .lock()
            .map(|mut g| std::mem::take(&mut *g))
            .unwrap_or_default()
    }
}

/// One recomputed decoder layer applied to its input.
pub(crate) struct RecomputeLayer {
    pub index: usize,
    pub layer: DecoderLayer,
    pub rotary: RotaryEmbedding,
    pub capacity_factor: Option<f64>,
    pub plan: Arc<Recompute>,
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::msg("recomputation state poisoned")
}

impl CustomOp1 for RecomputeLayer {
    fn name(&self) -> &'static str {
        "recompute-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = match l.contiguous_offsets() {
            Some((a, b)) => s.as_slice::<f32>()?[a..b].to_vec(),
            None => candle_core::bail!("recomputed layer expects a contiguous input"),
        };
        // A detached copy: nothing of this forward is kept for backward.
        let x = Tensor::from_vec(data, l.shape(), &candle_core::Device::Cpu)?;
        let (y, routing) = self
            .layer
            .forward(&x, &self.rotary, 0, None, self.capacity_factor)?;
        if let Some(mut r) = routing {
            // For metrics and the loss value only: the gradients of the auxiliary losses come
            // from the recomputed backward.
            r.logits = r.logits.detach();
            r.probs = r.probs.detach();
            r.weights = r.weights.detach();
            self.plan
                .routings
                .lock()
                .map_err(|_| poisoned())?
                .insert(self.index, r);
        }
        let y = y.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let (y, routing) =
            self.layer
                .forward(x.as_tensor(), &self.rotary, 0, None, self.capacity_factor)?;
        let mut objective = (y * grad.detach())?.sum_all()?;
        let aux = self.plan.aux.lock().map_err(|_| poisoned())?.clone();
        if let (Some(aux), Some(r)) = (aux, &routing) {
            if let Some(term) = aux(self.index, r)? {
                objective = (objective + term)?;
            }
        }
        let store = objective.backward()?;
        if let Some(params) = self.plan.params.get(&self.index) {
            let mut grads = self.plan.grads.lock().map_err(|_| poisoned())?;
            for (name, p) in params {
                if let Some(g) = store.get(p) {
                    let sum = match grads.remove(name) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    grads.insert(name.clone(), sum);
                }
            }
        }
        Ok(store.get(x.as_tensor()).cloned())
    }
}

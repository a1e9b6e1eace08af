//! AdamW with f32 moments and decoupled weight decay, learning-rate schedules, global-norm
//! gradient clipping and gradient accumulation — all updating buffers in place.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Storage, Tensor, Var};
use rayon::prelude::*;
use skymoe_kernels::adamw::{adamw_update, AdamWStep};

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Cosine from the peak to `min_lr` at the last step.
    Cosine,
    /// Linear from the peak to `min_lr` at the last step.
    Linear,
    /// Constant at the peak.
    Constant,
}

/// Linear warmup then decay.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warmup steps (linear from lr/warmup to lr).
    pub warmup_steps: u64,
    /// Total steps.
    pub total_steps: u64,
    /// Decay shape.
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of optimiser step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps.min(step)) as f64 / span as f64).clamp(0.0, 1.0);
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => self.lr + (self.min_lr - self.lr) * t,
            Decay::Cosine => {
                self.min_lr
                    + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (applied only to matrices, not to norms or biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
pub struct Moments {
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

/// AdamW over named variables.
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Moments by parameter name.
    pub moments: BTreeMap<String, Mutex<Moments>>,
    /// Optimiser steps taken.
    pub step: u64,
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("optimizer expects contiguous tensors"),
    }
}

/// A chunk of (parameter, gradient, first moment, second moment).
type UpdateChunk<'a> = (((&'a mut [f32], &'a [f32]), &'a mut [f32]), &'a mut [f32]);

struct AdamWUpdate<'a> {
    moments: &'a Mutex<Moments>,
    step: AdamWStep,
}

impl InplaceOp2 for AdamWUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let g = cpu_f32(s2, l2)?;
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("optimizer expects contiguous parameters")
        };
        let p = match s1 {
            CpuStorage::F32(v) => &mut v[a..b],
            _ => candle_core::bail!("optimizer expects f32 parameters"),
        };
        let mut guard = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned optimizer state".into()))?;
        let st = &mut *guard;
        if p.len() != g.len() || st.m.len() != p.len() {
            candle_core::bail!("optimizer state does not match the parameter");
        }
        let update = |(((p, g), m), v): UpdateChunk<'_>| adamw_update(&self.step, p, g, m, v);
        const CHUNK: usize = 1 << 14;
        let Moments { m, v } = st;
        if p.len() >= 2 * CHUNK {
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(update);
        } else {
            update((((p, g), m.as_mut_slice()), v.as_mut_slice()));
        }
        Ok(())
    }
}

/// Whether a parameter gets weight decay: matrices do, norms and biases do not.
pub fn decays(name: &str, var: &Var) -> bool {
    var.rank() >= 2 && !name.ends_with(".bias") && !name.contains("norm")
}

impl AdamW {
    /// Zero moments for every variable.
    pub fn new(config: AdamWConfig, vars: &BTreeMap<String, Var>) -> Self {
        let moments = vars
            .iter()
            .map(|(n, v)| {
                let k = v.elem_count();
                (
                    n.clone(),
                    Mutex::new(Moments {
                        m: vec![0.0; k],
                        v: vec![0.0; k],
                    }),
                )
            })
            .collect();
        AdamW {
            config,
            moments,
            step: 0,
        }
    }

    /// One update of every variable from `grads`, each first multiplied by `grad_scale`
    /// (clipping and accumulation averaging). Variables without a gradient are left as they are
    /// (their moments still decay as if the gradient were zero would change them; we skip them).
    pub fn step(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            let Some(moments) = self.moments.get(name) else {
                candle_core::bail!("no optimizer state for {name}")
            };
            let op = AdamWUpdate {
                moments,
                step: AdamWStep {
                    lr: lr as f32,
                    beta1: c.beta1 as f32,
                    beta2: c.beta2 as f32,
                    eps: c.eps as f32,
                    decay: if decays(name, var) {
                        c.weight_decay as f32
                    } else {
                        0.0
                    },
                    bias1: bias1 as f32,
                    bias2: bias2 as f32,
                    grad_scale: grad_scale as f32,
                },
            };
            let g = if g.is_contiguous() {
                g.clone()
            } else {
                g.contiguous()?
            };
            var.as_tensor().inplace_op2(&g, &op)?;
        }
        Ok(())
    }
}

/// Sum of squares of a tensor's elements, read in place (f32, contiguous or not).
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    if t.dtype() != DType::F32 {
        return sum_of_squares(&t.to_dtype(DType::F32)?);
    }
    if !t.is_contiguous() {
        return sum_of_squares(&t.contiguous()?);
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(skymoe_kernels::rows::sum_of_squares(cpu_f32(s, layout)?)),
        _ => Ok(t
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?),
    }
}

/// Global L2 norm of a set of gradients: the tensors' sums of squares computed in parallel,
/// added in the map's order (the same bits whatever the threads).
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    use rayon::prelude::*;
    let tensors: Vec<&Tensor> = grads.values().collect();
    let sums: Vec<Result<f64>> = tensors.par_iter().map(|g| sum_of_squares(g)).collect();
    let mut total = 0.0;
    for s in sums {
        total += s?;
    }
    Ok(total.sqrt())
}

struct AddInPlace;

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "add-in-place"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let src = cpu_f32(s2, l2)?;
        let Some((a, b)) = l1.contiguous_offsets() else {
            candle_core::bail!("accumulator must be contiguous")
        };
        match s1 {
            CpuStorage::F32(v) => {
                let dst = &mut v[a..b];
                if dst.len() != src.len() {
                    candle_core::bail!("accumulator shape mismatch");
                }
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                Ok(())
            }
            _ => candle_core::bail!("accumulator must be f32"),
        }
    }
}

/// The gradients of a step's micro-batches, summed in micro-batch order. The first
/// micro-batch's gradients are kept as they are (no copy); the second is added to them into a
/// fresh tensor (one pass over both), and later ones are added in place into that sum, which
/// nothing else shares.
#[derive(Debug, Default)]
pub struct GradSum {
    /// Each variable's gradient so far, and whether it is a sum this accumulator allocated
    /// (and may therefore update in place).
    sums: BTreeMap<String, (Tensor, bool)>,
}

impl GradSum {
    /// Add one micro-batch's gradients.
    pub fn add(&mut self, grads: BTreeMap<String, Tensor>) -> Result<()> {
        for (name, g) in grads {
            match self.sums.remove(&name) {
                None => {
                    self.sums.insert(name, (g, false));
                }
                Some((first, false)) => {
                    // Autograd results may share storage with other tensors: write the sum
                    // into a tensor of its own.
                    let sum = (&first + &g)?;
                    self.sums.insert(name, (sum, true));
                }
                Some((sum, true)) => {
                    let g = if g.is_contiguous() {
                        g
                    } else {
                        g.contiguous()?
                    };
                    sum.inplace_op2(&g, &AddInPlace)?;
                    self.sums.insert(name, (sum, true));
                }
            }
        }
        Ok(())
    }

    /// The summed gradients.
    pub fn into_grads(self) -> BTreeMap<String, Tensor> {
        self.sums.into_iter().map(|(n, (g, _))| (n, g)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_and_decays() {
        let s = Schedule {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Cosine,
        };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        let l = Schedule {
            decay: Decay::Linear,
            ..s.clone()
        };
        assert!((l.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((l.lr_at(35) - 0.775).abs() < 1e-12);
    }

    /// Two AdamW steps against a plain scalar re-implementation of the PyTorch update rule.
    #[test]
    fn adamw_matches_plain_reference() -> Result<()> {
        let dev = Device::Cpu;
        let w0 = vec![0.5f32, -1.0, 2.0, 0.0];
        let mut vars = BTreeMap::new();
        vars.insert(
            "layer.weight".to_string(),
            Var::from_tensor(&Tensor::from_vec(w0.clone(), (2, 2), &dev)?)?,
        );
        vars.insert(
            "layer.bias".to_string(),
            Var::from_tensor(&Tensor::from_vec(vec![1.0f32, 1.0], 2, &dev)?)?,
        );
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg.clone(), &vars);
        let gw = [vec![0.1f32, -0.2, 0.3, 0.0], vec![-0.5f32, 0.1, 0.2, 1.0]];
        let mut w: Vec<f64> = w0.iter().map(|&x| x as f64).collect();
        let (mut m, mut v) = (vec![0.0f64; 4], vec![0.0f64; 4]);
        for (t, g) in gw.iter().enumerate() {
            let mut grads = BTreeMap::new();
            grads.insert(
                "layer.weight".to_string(),
                Tensor::from_vec(g.clone(), (2, 2), &dev)?,
            );
            grads.insert(
                "layer.bias".to_string(),
                Tensor::from_vec(vec![0.5f32, -0.5], 2, &dev)?,
            );
            opt.step(&vars, &grads, 0.01, 1.0)?;
            let t = (t + 1) as i32;
            for i in 0..4 {
                let gi = g[i] as f64;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.99 * v[i] + 0.01 * gi * gi;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.99f64.powi(t));
                w[i] -= 0.01 * (mh / (vh.sqrt() + 1e-8) + 0.1 * w[i]);
            }
        }
        let got = vars["layer.weight"].flatten_all()?.to_vec1::<f32>()?;
        for i in 0..4 {
            assert!(
                (got[i] as f64 - w[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                got[i],
                w[i]
            );
        }
        // No decay on the bias: two steps of ±lr·(mhat/sqrt(vhat)) = ∓0.01 each.
        let b = vars["layer.bias"].to_vec1::<f32>()?;
        assert!(
            (b[0] - 0.98).abs() < 1e-5 && (b[1] - 1.02).abs() < 1e-5,
            "{b:?}"
        );
        Ok(())
    }

    #[test]
    fn global_norm_and_accumulation() -> Result<()> {
        let dev = Device::Cpu;
        let grads = |v: [f32; 2]| -> Result<BTreeMap<String, Tensor>> {
            Ok([("x".to_string(), Tensor::new(&v, &dev)?)].into())
        };
        let (g1, g2, g3) = (grads([3.0, 0.0])?, grads([0.0, 4.0])?, grads([1.0, 1.0])?);
        // One micro-batch: its gradients as they are.
        let mut one = GradSum::default();
        one.add(g1.clone())?;
        assert_eq!(one.into_grads()["x"].to_vec1::<f32>()?, vec![3.0, 0.0]);
        let mut sum = GradSum::default();
        sum.add(g1.clone())?;
        sum.add(g2.clone())?;
        let two = sum.into_grads();
        assert_eq!(two["x"].to_vec1::<f32>()?, vec![3.0, 4.0]);
        assert!((global_norm(&two)? - 5.0).abs() < 1e-12);
        let mut sum = GradSum::default();
        for g in [&g1, &g2, &g3] {
            sum.add(g.clone())?;
        }
        assert_eq!(sum.into_grads()["x"].to_vec1::<f32>()?, vec![4.0, 5.0]);
        for (g, want) in [(&g1, [3.0, 0.0]), (&g2, [0.0, 4.0]), (&g3, [1.0, 1.0])] {
            assert_eq!(
                g["x"].to_vec1::<f32>()?,
                want,
                "a micro-batch's gradient must not be aliased"
            );
        }
        // A transposed (non-contiguous) gradient adds as its values.
        let m = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev)?;
        let mut sum = GradSum::default();
        for _ in 0..3 {
            sum.add([("m".to_string(), m.t()?)].into())?;
        }
        assert_eq!(
            sum.into_grads()["m"].to_vec2::<f32>()?,
            vec![vec![3.0, 9.0], vec![6.0, 12.0]]
        );
        Ok(())
    }
}

//! `skymoe grads`: the loss of a token sequence and the gradient of every parameter, written
//! to a safetensors file (for external verification).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use skymoe_model::Checkpoint;
use skymoe_train::{loss_and_grads, TrainableParams};

/// Arguments of `skymoe grads`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]) found
    /// in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// Comma-separated token ids (at least two).
    #[arg(long)]
    tokens: String,
    /// Output safetensors file: `loss` (scalar f32, mean next-token cross-entropy, dropless,
    /// no auxiliary loss) and every parameter's gradient under its checkpoint name.
    #[arg(long)]
    out: PathBuf,
    /// Model-parallel layout over the processes of `mpirun` (data parallelism 1), e.g.
    /// `tp=2`, `edp=2`, `pp=2`, `edp=2,pp=2`; rank 0 writes the whole gradients.
    #[arg(long)]
    parallel: Option<String>,
    /// Decoder layers per pipeline stage, e.g. 1,2.
    #[arg(long)]
    pp_layers: Option<String>,
    /// Seconds a collective may wait for the other processes.
    #[arg(long, default_value_t = 600)]
    comm_timeout_s: u64,
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let procs = super::launch::Processes::detect()?;
    if procs.world > 1 || a.parallel.is_some() {
        return match run_parallel(&a, &procs) {
            Err(e) if procs.world > 1 => procs.fail(&e),
            other => other,
        };
    }
    let tokens = super::parse_tokens(&a.tokens)?;
    let device = super::device()?;
    let ckpt = Checkpoint::open(&a.model, &device)
        .with_context(|| format!("cannot open model {}", a.model.display()))?;
    let params = TrainableParams::from_checkpoint(&ckpt, &device)
        .with_context(|| format!("cannot load model {}", a.model.display()))?;
    let out =
        loss_and_grads(&params, &ckpt.config, &tokens, &device).context("backward pass failed")?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    map.insert("loss".into(), Tensor::new(out.loss, &Device::Cpu)?);
    for (name, g) in out.grads {
        map.insert(name, g.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
    }
    super::save_atomically(&map, &a.out)?;
    eprintln!(
        "loss {:.6}; wrote {} gradients to {}",
        out.loss,
        map.len() - 1,
        a.out.display()
    );
    Ok(())
}

/// The same file, computed by the processes of an `mpirun` job laid out by `--parallel`.
fn run_parallel(a: &Args, procs: &super::launch::Processes) -> anyhow::Result<()> {
    use skymoe_dist::mesh::Mesh;
    use skymoe_dist::model_parallel::parallel_grads;
    use skymoe_plan::layout::parse_counts;
    use skymoe_plan::{LayoutSpec, ModelShape};

    let tokens = super::parse_tokens(&a.tokens)?;
    let ckpt = Checkpoint::open(&a.model, &Device::Cpu)
        .with_context(|| format!("cannot open model {}", a.model.display()))?;
    let layout = LayoutSpec::parse(a.parallel.as_deref().unwrap_or(""))?.resolve(procs.world, 0)?;
    let mesh = Mesh::new(
        procs.world,
        procs.rank,
        layout,
        &ModelShape::from_config(&ckpt.config, "model"),
    )?;
    let world = procs.world_comm(std::time::Duration::from_secs(a.comm_timeout_s.max(1)));
    let comms = mesh.communicators(world.as_ref())?;
    let split = a.pp_layers.as_deref().map(parse_counts).transpose()?;
    let result = parallel_grads(
        &ckpt,
        &tokens,
        &mesh,
        comms,
        world.as_ref(),
        split.as_deref(),
    )
    .context("parallel backward pass failed")?;
    if let Some((loss, grads)) = result {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        map.insert("loss".into(), Tensor::new(loss, &Device::Cpu)?);
        map.extend(grads);
        super::save_atomically(&map, &a.out)?;
        eprintln!(
            "loss {loss:.6}; wrote {} gradients to {} ({} processes, {})",
            map.len() - 1,
            a.out.display(),
            procs.world,
            layout.to_arg()
        );
    }
    world.barrier()?;
    Ok(())
}

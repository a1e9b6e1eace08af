//! `skymoe serve`: the OpenAI-compatible HTTP server (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/models`, `/health`, `/metrics`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use skymoe_serve::engine::{EngineConfig, EngineHandle};
use skymoe_serve::model::{ServeModel, TensorParallel};
use skymoe_serve::openai::{self, ServerConfig};

/// Arguments of `skymoe serve`.
#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]) found
    /// in the local Hugging Face cache.
    #[arg(long, value_parser = super::model_arg)]
    model: PathBuf,
    /// Address to listen on (loopback by default; anything else exposes the server).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <KEY>` on /v1/* (also read from SKYMOE_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Most requests generated at once (the batch size).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Most requests running or waiting; beyond it the server answers 429.
    #[arg(long)]
    max_queue: Option<usize>,
    /// Weight format the linear layers are stored in for inference.
    #[arg(long, value_parser = ["fp8", "int8", "q4", "f16", "f32"])]
    weights: Option<String>,
    /// The model id clients pass as `model` (default: the model's directory or file name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// KV-cache size in blocks (default: the engine's choice).
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// Element type of the KV cache: auto (f32 with f32 weights, else f16), f32, f16 or int8
    /// (a scale per position and kv head).
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Do not share the KV blocks of identical prompt prefixes between requests (automatic
    /// prefix caching is on by default).
    #[arg(long)]
    no_prefix_caching: bool,
    /// Largest request body accepted, in MiB.
    #[arg(long, default_value_t = 4)]
    max_body_mib: usize,
    /// Under `mpirun`: relative share of each process of the tensor-parallel split, e.g.
    /// 2,1,1 (default: equal; heads and FFN columns that do not divide are split unevenly).
    #[arg(long)]
    tp_weights: Option<String>,
    /// Under `mpirun`: a collective waiting longer than this many seconds ends the job.
    #[arg(long, default_value_t = 3600)]
    comm_timeout_s: u64,
}

/// The model id derived from its path: the directory name, or the file name without `.gguf`.
fn default_model_id(path: &std::path::Path) -> String {
    let p = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let name = if p.is_file() {
        p.file_stem()
    } else {
        p.file_name()
    };
    name.and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("skymoe")
        .to_string()
}

/// Run the verb.
pub fn run(a: Args) -> anyhow::Result<()> {
    let mut config = EngineConfig::default();
    if let Some(n) = a.max_concurrency {
        anyhow::ensure!(n >= 1, "--max-concurrency must be at least 1");
        config.max_batch = n;
    }
    if let Some(n) = a.max_queue {
        anyhow::ensure!(n >= 1, "--max-queue must be at least 1");
        config.max_queue = n;
    }
    if a.kv_blocks.is_some() {
        config.kv_blocks = a.kv_blocks;
    }
    config.kv_dtype = crate::cmd::bench::parse_kv_dtype(&a.kv_cache_dtype)?;
    config.enable_prefix_caching = !a.no_prefix_caching;
    config.model_id = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_model_id(&a.model));
    let format = a
        .weights
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("invalid --weights")?;
    anyhow::ensure!(a.max_body_mib >= 1, "--max-body-mib must be at least 1");
    let api_key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("SKYMOE_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let server = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        api_key,
        max_body_bytes: a.max_body_mib << 20,
    };
    let loopback = matches!(server.host.as_str(), "127.0.0.1" | "localhost" | "::1");
    if !loopback && server.api_key.is_none() {
        tracing::warn!(
            host = %server.host,
            "listening beyond loopback without --api-key: anyone who can reach it can use it"
        );
    }

    let procs = super::launch::Processes::detect()?;
    let tp_weights = super::tp::parse_weights(a.tp_weights.as_deref())?;
    if procs.world == 1 {
        anyhow::ensure!(
            tp_weights.is_none(),
            "--tp-weights needs several processes (mpirun -np N)"
        );
        let engine = EngineHandle::load(&a.model, format, config)
            .with_context(|| format!("cannot load model {}", a.model.display()))?;
        return serve_http(engine, server);
    }
    // Tensor parallelism over the mpirun job: rank 0 serves HTTP and leads, the other ranks
    // follow its forward passes; this thread runs the collectives.
    let comm = procs.world_comm(std::time::Duration::from_secs(a.comm_timeout_s.max(1)));
    let rank = procs.rank;
    let model = a.model.clone();
    let outcome = super::tp::with_comm_thread(comm.as_ref(), move |c| -> anyhow::Result<()> {
        let tp = TensorParallel::new(c, tp_weights)?;
        if rank == 0 {
            let engine = EngineHandle::load_sharded(&model, format, config, Some(tp))
                .with_context(|| format!("cannot load model {}", model.display()))?;
            return serve_http(engine, server);
        }
        // mpirun passes SIGINT/SIGTERM to every rank: the followers ignore them and stop when
        // rank 0, having drained its requests, releases them.
        ignore_shutdown_signals()?;
        let ckpt = skymoe_model::Checkpoint::open(&model, &candle_core::Device::Cpu)
            .with_context(|| format!("cannot open model {}", model.display()))?;
        let served = ServeModel::load_sharded(&ckpt, format, Some(tp))?;
        drop(ckpt);
        let mut kv = served.new_kv_cache(
            config.block_size,
            config.kv_blocks_for(&served),
            config.kv_dtype,
        );
        served.follow(&mut kv)?;
        Ok(())
    })
    .and_then(|r| r);
    match outcome {
        Err(e) => procs.fail(&e),
        Ok(()) => Ok(()),
    }
}

/// Catch SIGINT/SIGTERM for the rest of the process's life and do nothing with them.
fn ignore_shutdown_signals() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    std::thread::Builder::new()
        .name("skymoe-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                loop {
                    openai::shutdown_signal().await;
                    tracing::info!(
                        "a follower rank ignores the signal; rank 0 decides when to stop"
                    );
                }
            })
        })?;
    Ok(())
}

/// Serve `engine` over HTTP until a shutdown signal, then drain.
fn serve_http(engine: EngineHandle, server: ServerConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = openai::bind(&server).await?;
        let addr = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "skymoe serve: model `{}` ({} tokens of context) on http://{addr}",
                engine.model_id(),
                engine.context_length()
            )?;
            out.flush()?;
        }
        openai::serve_on(listener, engine, server, openai::shutdown_signal()).await?;
        eprintln!("skymoe serve: drained and stopped");
        anyhow::Ok(())
    })
}

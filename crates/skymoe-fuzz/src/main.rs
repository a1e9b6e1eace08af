//! `skymoe-fuzz`: a mutation fuzzer for skymoe's file parsers on the stable toolchain.
//!
//! ```text
//! skymoe-fuzz fuzz <target|all> [--seconds N] [--runs N] [--seed N] [--max-len BYTES]
//!                  [--timeout-ms N] [--fixtures DIR] [--findings DIR] [--save-corpus DIR]
//!                  [--keep-going]
//! skymoe-fuzz run <target> <file or directory>...    replay inputs (exit 70 on a panic)
//! skymoe-fuzz minimize <target> <file> [--out FILE]   shrink an input that still fails
//! skymoe-fuzz seeds <target> <directory>              write the seeds (for cargo fuzz)
//! skymoe-fuzz list                                    the targets
//! ```
//!
//! Exit status: 0 when nothing was found, 70 after a panic, 71 after a hang, and an abort
//! (SIGABRT) after an allocation over the limit (512 MiB at once or 2 GiB live by default).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use skymoe_fuzz::alloc::{self, LimitAlloc};
use skymoe_fuzz::runner::{self, Options, EXIT_PANIC};
use skymoe_fuzz::targets::{seeds, Target};

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc::new();

const USAGE: &str = "usage:
  skymoe-fuzz fuzz <target|all> [--seconds N] [--runs N] [--seed N] [--max-len BYTES]
                   [--timeout-ms N] [--fixtures DIR] [--findings DIR] [--save-corpus DIR]
                   [--keep-going] [--alloc-limit-mb N]
  skymoe-fuzz run <target> <file or directory>... [--repeat N] [--timeout-ms N]
  skymoe-fuzz minimize <target> <file> [--out FILE]
  skymoe-fuzz seeds <target|all> <directory>
  skymoe-fuzz list
targets: safetensors, gguf, pytorch, pickle, sentencepiece";

fn default_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn targets(name: &str) -> Result<Vec<Target>, String> {
    if name == "all" {
        return Ok(Target::ALL.to_vec());
    }
    Target::from_name(name)
        .map(|t| vec![t])
        .ok_or_else(|| format!("unknown target `{name}`"))
}

/// Flags `--name value` and switches `--name` after the positional arguments.
struct Args {
    positional: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse(args: &[String], switches: &[&str]) -> Result<Args, String> {
        let mut positional = Vec::new();
        let mut flags = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                if switches.contains(&name) {
                    flags.push((name.to_string(), None));
                } else {
                    let v = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                    flags.push((name.to_string(), Some(v.clone())));
                }
            } else {
                positional.push(a.clone());
            }
        }
        Ok(Args { positional, flags })
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }

    fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        self.value(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--{name}: not a number: {v}"))
            })
            .transpose()
    }
}

fn fuzz(args: &Args) -> Result<ExitCode, String> {
    let [name] = args.positional.as_slice() else {
        return Err("fuzz takes one target (or all)".into());
    };
    let list = targets(name)?;
    if let Some(mb) = args.number::<usize>("alloc-limit-mb")? {
        alloc::set_limits(mb << 20, alloc::DEFAULT_TOTAL_LIMIT.max(mb << 21));
    }
    let seed = args.number::<u64>("seed")?.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let base = Options {
        target: list[0],
        duration: args.number::<f64>("seconds")?.map(Duration::from_secs_f64),
        runs: args.number("runs")?,
        seed,
        max_len: args.number("max-len")?.unwrap_or(1 << 20),
        timeout: Duration::from_millis(args.number("timeout-ms")?.unwrap_or(20_000)),
        fixtures: args
            .value("fixtures")
            .map(PathBuf::from)
            .unwrap_or_else(default_fixtures),
        findings: args
            .value("findings")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target/fuzz-findings")),
        save_corpus: args.value("save-corpus").map(PathBuf::from),
        keep_going: args.has("keep-going"),
        max_pool: 4096,
        max_pool_bytes: 256 << 20,
    };
    if base.duration.is_none() && base.runs.is_none() {
        return Err("say how long: --seconds N or --runs N".into());
    }
    let mut found = 0;
    for (i, &target) in list.iter().enumerate() {
        let opts = Options {
            target,
            seed: seed.wrapping_add(i as u64),
            save_corpus: base.save_corpus.as_ref().map(|d| d.join(target.name())),
            ..base.clone()
        };
        eprintln!(
            "== fuzzing {} (seed {}, {})",
            target.name(),
            opts.seed,
            match (opts.duration, opts.runs) {
                (Some(d), _) => format!("{:.0} s", d.as_secs_f64()),
                (None, Some(n)) => format!("{n} runs"),
                (None, None) => unreachable!(),
            }
        );
        let r = runner::fuzz(&opts);
        let secs = r.elapsed.as_secs_f64();
        println!(
            "{}: {} runs ({} seeds) in {secs:.1} s, {:.0} runs/s, {} behaviours, pool {}, \
             most heap for one input {:.1} MiB, {} finding(s)",
            target.name(),
            r.runs,
            r.seeds,
            r.runs as f64 / secs.max(1e-9),
            r.behaviours,
            r.pool,
            r.peak_heap as f64 / (1 << 20) as f64,
            r.findings.len()
        );
        for f in &r.findings {
            println!("  {}: {} -> {}", f.kind, f.message, f.path.display());
        }
        found += r.findings.len();
    }
    Ok(if found == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PANIC as u8)
    })
}

fn inputs(paths: &[String]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        let p = PathBuf::from(p);
        if p.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                let mut files: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect();
                files.sort();
                out.extend(files);
            }
        } else {
            out.push(p);
        }
    }
    out
}

fn run(args: &Args) -> Result<ExitCode, String> {
    let Some((name, paths)) = args.positional.split_first() else {
        return Err("run takes a target and inputs".into());
    };
    let target = Target::from_name(name).ok_or_else(|| format!("unknown target `{name}`"))?;
    runner::install(Duration::from_millis(
        args.number("timeout-ms")?.unwrap_or(20_000),
    ));
    let findings = std::env::temp_dir().join("skymoe-fuzz-replay");
    let repeat = args.number::<usize>("repeat")?.unwrap_or(1).max(1);
    let mut failed = 0;
    for path in inputs(paths) {
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let t = std::time::Instant::now();
        let live = alloc::live_bytes();
        let mut outcome = Ok(0);
        for _ in 0..repeat {
            outcome = runner::run_one(target, &findings, &data);
            if outcome.is_err() {
                break;
            }
        }
        match outcome {
            // With --repeat, the growth of the live heap shows a leak.
            Ok(_) => println!(
                "ok    {} ({} bytes, {:.1} ms, live heap {:+} bytes)",
                path.display(),
                data.len(),
                t.elapsed().as_secs_f64() * 1e3 / repeat as f64,
                alloc::live_bytes() as i64 - live as i64
            ),
            Err(m) => {
                failed += 1;
                println!("PANIC {}: {m}", path.display());
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PANIC as u8)
    })
}

/// Whether `data` still fails in a fresh process (panic, hang or allocation over the limit).
fn fails(target: Target, data: &[u8], scratch: &Path) -> bool {
    if std::fs::write(scratch, data).is_err() {
        return false;
    }
    let Ok(exe) = std::env::current_exe() else {
        return false;
    };
    std::process::Command::new(exe)
        .args(["run", target.name()])
        .arg(scratch)
        .args(["--timeout-ms", "5000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(false)
}

fn minimize(args: &Args) -> Result<ExitCode, String> {
    let [name, file] = args.positional.as_slice() else {
        return Err("minimize takes a target and one input".into());
    };
    let target = Target::from_name(name).ok_or_else(|| format!("unknown target `{name}`"))?;
    let mut data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
    let out = args
        .value("out")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("{file}.min")));
    let scratch = std::env::temp_dir().join(format!("skymoe-fuzz-min-{}", std::process::id()));
    if !fails(target, &data, &scratch) {
        let _ = std::fs::remove_file(&scratch);
        return Err(format!("{file} does not fail; nothing to minimise"));
    }
    // Remove ever smaller chunks while the input keeps failing.
    let mut chunk = data.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        while i < data.len() {
            let end = (i + chunk).min(data.len());
            let mut candidate = data[..i].to_vec();
            candidate.extend_from_slice(&data[end..]);
            if fails(target, &candidate, &scratch) {
                data = candidate;
                eprintln!("   {} bytes", data.len());
            } else {
                i += chunk;
            }
        }
        if chunk == 1 {
            break;
        }
        chunk /= 2;
    }
    let _ = std::fs::remove_file(&scratch);
    std::fs::write(&out, &data).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("{} bytes -> {}", data.len(), out.display());
    Ok(ExitCode::SUCCESS)
}

fn write_seeds(args: &Args) -> Result<ExitCode, String> {
    let [name, dir] = args.positional.as_slice() else {
        return Err("seeds takes a target (or all) and a directory".into());
    };
    let fixtures = args
        .value("fixtures")
        .map(PathBuf::from)
        .unwrap_or_else(default_fixtures);
    for target in targets(name)? {
        let dir = if name == "all" {
            Path::new(dir).join(target.name())
        } else {
            PathBuf::from(dir)
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let list = seeds(target, &fixtures);
        for (_, bytes) in &list {
            let p = dir.join(format!("seed-{:016x}", runner::fnv(bytes)));
            std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        println!(
            "{}: {} seeds -> {}",
            target.name(),
            list.len(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = Args::parse(rest, &["keep-going"]).and_then(|args| match cmd.as_str() {
        "fuzz" => fuzz(&args),
        "run" => run(&args),
        "minimize" => minimize(&args),
        "seeds" => write_seeds(&args),
        "list" => {
            for t in Target::ALL {
                println!("{}", t.name());
            }
            Ok(ExitCode::SUCCESS)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command `{other}`\n{USAGE}")),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skymoe-fuzz: {e}");
            ExitCode::from(2)
        }
    }
}

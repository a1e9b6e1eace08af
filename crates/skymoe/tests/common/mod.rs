//! Helpers shared by the binary's integration tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

/// The committed reference fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference")
}

/// The small training corpus of the tests.
pub fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/corpus")
}

/// A 1-D tensor of token ids as `--tokens` takes them (`1,2,3`).
pub fn token_list(ids: &candle_core::Tensor) -> String {
    let ids: Vec<String> = ids
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|t| t.to_string())
        .collect();
    ids.join(",")
}

/// The largest magnitude of a tensor's elements.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Run the `skymoe` binary.
pub fn skymoe(args: &[&str]) -> Output {
    skymoe_with_env(args, &[])
}

/// Run the `skymoe` binary with extra environment variables.
pub fn skymoe_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skymoe"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run skymoe")
}

/// The command failed with a message containing `needle`, and did not panic.
pub fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "stderr should mention `{needle}`: {stderr}"
    );
}

/// One HTTP/1.1 request with `Connection: close`; returns the status and the body.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status: u16 = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {raw:?}"));
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// An `mpirun` command for `np` processes of the `skymoe` binary, with its own OpenMPI
/// session directory, removed when this value is dropped: keep it alive while the job runs.
///
/// Concurrent jobs of one user otherwise share `/tmp/ompi.<host>.<uid>`, and one job's cleanup
/// can remove that directory while another job creates its session in it (OpenMPI then
/// fails at start with "A call to mkdir was unable to create the desired directory").
pub struct Mpirun {
    command: Command,
    _session: tempfile::TempDir,
}

impl Mpirun {
    /// `mpirun -np np --oversubscribe skymoe`, allowed to run as root.
    pub fn new(np: usize) -> Self {
        let session = tempfile::Builder::new()
            .prefix("skymoe-mpirun-")
            .tempdir()
            .expect("a session directory for mpirun");
        let mut command = Command::new("mpirun");
        command
            .args(["-np", &np.to_string(), "--oversubscribe"])
            .arg(env!("CARGO_BIN_EXE_skymoe"))
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_orte_tmpdir_base", session.path());
        Mpirun {
            command,
            _session: session,
        }
    }
}

impl std::ops::Deref for Mpirun {
    type Target = Command;
    fn deref(&self) -> &Command {
        &self.command
    }
}

impl std::ops::DerefMut for Mpirun {
    fn deref_mut(&mut self) -> &mut Command {
        &mut self.command
    }
}

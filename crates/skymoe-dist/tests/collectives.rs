//! The MPI engine under `mpirun`: every collective against its definition, on 2 and 4 ranks,
//! and faults (a dead rank, a hung rank) that end every rank with a message naming one.
//!
//! Each test relaunches its own test binary under `mpirun` and checks the outcome; inside
//! `mpirun` (OMPI_COMM_WORLD_SIZE set) the same test runs the checks on its rank.
#![cfg(feature = "mpi")]

use std::process::{Command, Output};
use std::time::Duration;

use skymoe_dist::comm::mpi_engine::MpiRuntime;
use skymoe_dist::comm::Communicator;

fn under_mpirun() -> bool {
    std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some()
}

/// Run test `name` of this binary on `np` ranks.
///
/// Each job gets its own OpenMPI session directory: concurrent jobs of one user otherwise share
/// `/tmp/ompi.<host>.<uid>`, and one job's cleanup can remove it while another job creates its
/// session in it (the job then fails at start, "unable to create the desired directory").
fn mpirun(np: usize, name: &str, env: &[(&str, &str)]) -> Output {
    let exe = std::env::current_exe().expect("test binary");
    let session = tempfile::Builder::new()
        .prefix("skymoe-mpirun-")
        .tempdir()
        .expect("a session directory for mpirun");
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string(), "--oversubscribe"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_orte_tmpdir_base", session.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("mpirun (apt-get install openmpi-bin)")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn every_collective_matches_its_definition() {
    if !under_mpirun() {
        for np in [2, 4] {
            let out = mpirun(np, "every_collective_matches_its_definition", &[]);
            assert!(out.status.success(), "np={np}:\n{}", text(&out));
        }
        return;
    }
    let rt = MpiRuntime::init().expect("MPI initialises once");
    let world = rt.world(Duration::from_secs(60));
    let (r, n) = (world.rank(), world.size());
    let rf = r as f32;

    // all-reduce: Σ_r (r + i)
    let mut v: Vec<f32> = (0..5).map(|i| rf + i as f32).collect();
    world.all_reduce_sum(&mut v).unwrap();
    let total: f32 = (0..n).map(|q| q as f32).sum();
    for (i, x) in v.iter().enumerate() {
        assert_eq!(*x, total + (n * i) as f32);
    }
    let mut d = vec![0.5f64 * r as f64];
    world.all_reduce_sum_f64(&mut d).unwrap();
    assert_eq!(d[0], 0.5 * total as f64);
    let mut m = vec![10 + r as u64];
    world.all_reduce_min_u64(&mut m).unwrap();
    assert_eq!(m[0], 10);

    // reduce-scatter: block b of rank q holds q*100 + b; rank r keeps Σ_q (q*100 + r).
    let send: Vec<f32> = (0..n)
        .flat_map(|b| vec![rf * 100.0 + b as f32; 3])
        .collect();
    let mut recv = vec![0f32; 3];
    world.reduce_scatter_sum(&send, &mut recv).unwrap();
    assert_eq!(recv, vec![100.0 * total + (n * r) as f32; 3]);

    // all-gather.
    let mut all = vec![0f32; 2 * n];
    world.all_gather(&[rf, -rf], &mut all).unwrap();
    for q in 0..n {
        assert_eq!(&all[2 * q..2 * q + 2], &[q as f32, -(q as f32)]);
    }

    // variable all-to-all: rank r sends (r + j) copies of 1000r + j to rank j.
    let send_counts: Vec<usize> = (0..n).map(|j| r + j).collect();
    let recv_counts: Vec<usize> = (0..n).map(|q| q + r).collect();
    let send: Vec<f32> = (0..n)
        .flat_map(|j| vec![1000.0 * rf + j as f32; r + j])
        .collect();
    let got = world
        .all_to_all_v(&send, &send_counts, &recv_counts)
        .unwrap();
    let want: Vec<f32> = (0..n)
        .flat_map(|q| vec![1000.0 * q as f32 + rf; q + r])
        .collect();
    assert_eq!(got, want);
    assert!(world.all_to_all_v(&send, &[1], &recv_counts).is_err());

    // send/recv around a ring.
    let next = (r + 1) % n;
    let prev = (r + n - 1) % n;
    let mut buf = vec![0f32; 4];
    if r % 2 == 0 {
        world.send(&[rf; 4], next, 7).unwrap();
        world.recv(&mut buf, prev, 7).unwrap();
    } else {
        world.recv(&mut buf, prev, 7).unwrap();
        world.send(&[rf; 4], next, 7).unwrap();
    }
    assert_eq!(buf, vec![prev as f32; 4]);

    // broadcast from the last rank.
    let mut b = if r == n - 1 {
        vec![3.5f32, 4.5]
    } else {
        vec![0.0; 2]
    };
    world.broadcast(&mut b, n - 1).unwrap();
    assert_eq!(b, vec![3.5, 4.5]);

    // sub-communicators: even and odd ranks.
    let sub = world.split(r % 2, r).unwrap();
    assert_eq!(sub.size(), (n + 1 - r % 2) / 2);
    assert_eq!(sub.rank(), r / 2);
    let mut s = vec![rf];
    sub.all_reduce_sum(&mut s).unwrap();
    let want: f32 = (0..n).filter(|q| q % 2 == r % 2).map(|q| q as f32).sum();
    assert_eq!(s[0], want);
    world.barrier().unwrap();
    // Bad arguments are errors, not crashes.
    assert!(world.send(&[1.0], n + 3, 0).is_err());
    assert!(world.reduce_scatter_sum(&[1.0; 3], &mut [0.0; 2]).is_err());
}

#[test]
fn a_dead_rank_stops_every_rank() {
    if !under_mpirun() {
        let out = mpirun(3, "a_dead_rank_stops_every_rank", &[]);
        let t = text(&out);
        assert!(!out.status.success(), "{t}");
        assert!(
            t.contains("rank 1"),
            "the message names the dead rank:\n{t}"
        );
        return;
    }
    let rt = MpiRuntime::init().expect("MPI");
    let world = rt.world(Duration::from_secs(20));
    if world.rank() == 1 {
        // A rank killed from outside.
        unsafe_kill_self();
    }
    let mut v = vec![1f32; 4];
    let _ = world.all_reduce_sum(&mut v);
    // Unreachable when the job is stopped; if the collective returned, fail loudly.
    panic!(
        "rank {} finished an all-reduce with a dead peer",
        world.rank()
    );
}

/// SIGKILL this process, as a crash or an out-of-memory kill would.
fn unsafe_kill_self() -> ! {
    let pid = std::process::id().to_string();
    let _ = Command::new("kill").args(["-9", &pid]).status();
    std::thread::sleep(Duration::from_secs(60));
    unreachable!("kill -9 did not kill");
}

#[test]
fn a_hung_rank_times_out_with_the_waiting_ranks_named() {
    if !under_mpirun() {
        let out = mpirun(2, "a_hung_rank_times_out_with_the_waiting_ranks_named", &[]);
        let t = text(&out);
        assert!(!out.status.success(), "{t}");
        assert!(
            t.contains("rank 0: all_reduce did not complete within 2 s"),
            "{t}"
        );
        return;
    }
    let rt = MpiRuntime::init().expect("MPI");
    let world = rt.world(Duration::from_secs(2));
    if world.rank() == 1 {
        // Hangs without dying (a deadlock, a stuck device).
        std::thread::sleep(Duration::from_secs(60));
    }
    let mut v = vec![1f32; 4];
    let _ = world.all_reduce_sum(&mut v);
    panic!(
        "rank {} finished an all-reduce with a hung peer",
        world.rank()
    );
}

//! The NCCL engine builds without a CUDA toolkit; where the NVIDIA driver or NCCL is missing
//! it reports that clearly instead of panicking inside cudarc.
#![cfg(feature = "nccl")]

use std::time::Duration;

use skymoe_dist::comm::nccl_engine::{probe, NcclComm};
use skymoe_dist::comm::{SingleProcess, Watchdog};

#[test]
fn missing_driver_is_a_clear_error() {
    let driver_present = probe().is_ok();
    let made = NcclComm::new(
        Box::new(SingleProcess),
        0,
        Watchdog::start(0, Duration::from_secs(60)),
    );
    match made {
        Ok(comm) => {
            assert!(driver_present);
            use skymoe_dist::comm::Communicator;
            let mut v = vec![1.0f32, 2.0];
            comm.all_reduce_sum(&mut v).unwrap();
            assert_eq!(v, vec![1.0, 2.0]);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!driver_present || msg.contains("NCCL"), "{msg}");
            if !driver_present {
                assert!(
                    msg.contains("libcuda.so.1") || msg.contains("libnccl.so.2"),
                    "{msg}"
                );
            }
        }
    }
}

//! `skymoe plan --calibrate`: fit the cost model's compute constants to this machine.

use std::path::Path;

/// Run the calibration.
pub fn run(_out: Option<&Path>, _quick: bool, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("calibration is not built yet")
}

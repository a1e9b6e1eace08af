//! `skymoe report`: plots and an HTML page from a run's metrics log.

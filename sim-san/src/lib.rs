//! sim-san: Floe's hardware-emulating SAN.
//!
//! An emulated storage array, run as its own process: LUNs on sparse files
//! exported over NBD (TCP), virtual volumes laid out across LUNs, array
//! snapshots with copy-on-write into a reserve, extent migration, read
//! errors and latency on demand, and a deterministic scheduler that remaps
//! while a mover reads. Controlled through a versioned JSON API
//! (`docs/sim-san-control.md`).

pub mod array;
pub mod cli;
pub mod control;
pub mod nbd;
pub mod vtl;

use array::Array;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;

/// A running simulator (its threads live as long as the process).
pub struct SimSan {
    /// The array.
    pub array: Arc<Array>,
    /// Where NBD clients connect.
    pub nbd_addr: SocketAddr,
    /// Where the control API listens.
    pub control_addr: SocketAddr,
}

impl SimSan {
    /// Start an array in `dir`, NBD on `nbd`, control on `control`
    /// (`127.0.0.1:0` picks free ports).
    pub fn start(dir: &Path, seed: u64, nbd: &str, control: &str) -> std::io::Result<SimSan> {
        let array = Arc::new(Array::new(dir, seed).map_err(std::io::Error::other)?);
        let nbd_l = TcpListener::bind(nbd)?;
        let ctl_l = TcpListener::bind(control)?;
        let nbd_addr = nbd_l.local_addr()?;
        let control_addr = ctl_l.local_addr()?;
        let a = array.clone();
        std::thread::spawn(move || nbd::serve(a, nbd_l));
        let a = array.clone();
        std::thread::spawn(move || {
            for conn in ctl_l.incoming().flatten() {
                let a = a.clone();
                let _ = conn.set_nodelay(true);
                std::thread::spawn(move || control::serve_connection(a, conn));
            }
        });
        Ok(SimSan {
            array,
            nbd_addr,
            control_addr,
        })
    }

    /// A control client for this simulator.
    pub fn client(&self) -> Result<control::Client, control::ArrayError> {
        control::Client::connect(&self.control_addr.to_string())
    }
}

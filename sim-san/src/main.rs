//! `floe-sim-san`: the simulated SAN as its own process.
use clap::Parser;

/// Floe's hardware-emulating SAN: LUNs over NBD, volumes, copy-on-write
/// snapshots, remaps and faults on demand.
#[derive(Parser)]
#[command(name = "floe-sim-san", version)]
struct Cli {
    #[command(subcommand)]
    command: floe_sim_san::cli::Command,
}

fn main() -> std::process::ExitCode {
    match floe_sim_san::cli::run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floe-sim-san: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

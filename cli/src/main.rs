//! `floe`: off-host backup for Linux. A thin shell over floe-core.
mod commands;

use clap::Parser;

/// mimalloc instead of glibc's malloc: the agent and the mover allocate and
/// free millions of small strings per backup (item ids, paths, JSON);
/// measured on the 70,000-file tree, glibc's malloc/free/consolidate were a
/// fifth of the agent's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floe: error: {e:#}");
            // A committed but partial set is its own outcome for scripts.
            if e.downcast_ref::<commands::Partial>().is_some() {
                std::process::ExitCode::from(3)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

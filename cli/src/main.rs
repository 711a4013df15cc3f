//! `floe`: off-host backup for Linux. A thin shell over floe-core.
mod commands;

use clap::Parser;

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

use std::process::ExitCode;

use castnode::config::{Cli, LogFormat};
use clap::FromArgMatches;
use clap::error::ErrorKind;

/// mimalloc instead of glibc's malloc: media buffers of 1–64 KiB are allocated per frame and
/// held for seconds in the hub (two groups per broadcast), a pattern on which glibc's large-bin
/// searches cost a relay a tenth of its CPU (BENCHMARKS.md, "Cluster link").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let matches = match castnode::config::command().try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => return clap_exit(&e, &argv),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => return clap_exit(&e, &argv),
    };
    let (role, args) = cli.role.parts();
    let cfg = match args.resolve_for(role) {
        Ok(c) => c,
        Err(e) => {
            let e = match matches.subcommand_matches(role) {
                Some(m) => e.located(m, role),
                None => e,
            };
            eprintln!("castnode: {e}");
            return ExitCode::from(64);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and tests get plain `key=value` text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("castnode: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = async {
        if role == "manager" {
            castnode::role::manager::run(cfg).await
        } else {
            castnode::role::standalone::run_role(cfg, role).await
        }
    };
    match rt.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("castnode: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reports what clap refused (naming the environment variable when the value came from one);
/// help and version exit 0, anything else 64 (EX_USAGE).
fn clap_exit(e: &clap::Error, argv: &[std::ffi::OsString]) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            match castnode::config::env_value_error(e, argv) {
                Some(msg) => eprintln!("castnode: {msg}"),
                None => {
                    let _ = e.print();
                }
            }
            ExitCode::from(64)
        }
    }
}

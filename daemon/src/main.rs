//! Command line of `autozymed`; everything else lives in the library.

use autozymed::config::{self, CliOptions, BUILD_ID, VERSION};
use std::path::PathBuf;

const USAGE: &str = "\
usage: autozymed [--runtime-dir DIR] [--threads N] [--idle-timeout SECS]
       autozymed --build-id | --version | --help

  --runtime-dir DIR     where daemon.sock and daemon.pid live
                        (default: $AUTOZYME_RUNTIME_DIR, else $XDG_RUNTIME_DIR/autozyme,
                        else <tmp>/autozyme-<uid>)
  --threads N           worker threads (default: $AUTOZYME_THREADS, else all cores)
  --idle-timeout SECS   exit after SECS without requests, 0 = never
                        (default: $AUTOZYME_IDLE_TIMEOUT, else 1800)";

enum Command {
    Serve(CliOptions),
    BuildId,
    Version,
    Help,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut opts = CliOptions::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // Both "--flag value" and "--flag=value".
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--build-id" => return Ok(Command::BuildId),
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "--runtime-dir" => opts.runtime_dir = Some(PathBuf::from(value("--runtime-dir")?)),
            "--threads" => {
                let v = value("--threads")?;
                opts.threads = Some(v.parse().map_err(|_| format!("bad --threads {v:?}"))?);
            }
            "--idle-timeout" => {
                let v = value("--idle-timeout")?;
                opts.idle_timeout_s =
                    Some(v.parse().map_err(|_| format!("bad --idle-timeout {v:?}"))?);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Command::Serve(opts))
}

fn main() {
    let code = match parse_args(std::env::args().skip(1)) {
        Ok(Command::BuildId) => {
            println!("{BUILD_ID}");
            0
        }
        Ok(Command::Version) => {
            println!("autozymed {VERSION} (build {BUILD_ID})");
            0
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            0
        }
        Ok(Command::Serve(opts)) => match config::resolve(&opts) {
            Ok(cfg) => autozymed::server::run(cfg),
            Err(e) => {
                eprintln!("autozymed: {e}");
                2
            }
        },
        Err(e) => {
            eprintln!("autozymed: {e}\n{USAGE}");
            2
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn options_in_both_spellings() {
        let Ok(Command::Serve(opts)) = parse(&[
            "--runtime-dir",
            "/x/y",
            "--threads=3",
            "--idle-timeout",
            "0",
        ]) else {
            panic!("should parse");
        };
        assert_eq!(
            opts,
            CliOptions {
                runtime_dir: Some(PathBuf::from("/x/y")),
                threads: Some(3),
                idle_timeout_s: Some(0),
            }
        );
        assert!(matches!(parse(&[]), Ok(Command::Serve(o)) if o == CliOptions::default()));
        assert!(matches!(parse(&["--build-id"]), Ok(Command::BuildId)));
        assert!(matches!(parse(&["--version"]), Ok(Command::Version)));
    }

    #[test]
    fn bad_arguments() {
        assert!(parse(&["--threads"]).is_err());
        assert!(parse(&["--threads", "many"]).is_err());
        assert!(parse(&["--idle-timeout=-1"]).is_err());
        assert!(parse(&["--frobnicate"]).is_err());
        assert!(parse(&["serve"]).is_err());
    }
}

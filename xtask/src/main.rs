//! The project's dev commands: `cargo xtask <command>` (see `cargo xtask --help`).

mod bench;
mod cmd;
mod compat;
mod demo;
mod ebpf;
mod lint;
mod root;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Dev commands for rt-ebpf-trace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the tracer's overhead on real tokio workloads (as root) and
    /// write the results into BENCHMARKS.md.
    Bench(bench::Options),
    /// Build the compatibility matrix's service for every cell (or only
    /// the fast subset `cargo xtask test` runs), as the user.
    CompatBuild {
        /// Every cell, not only the fast subset.
        #[arg(long)]
        all: bool,
    },
    /// Rewrite the README's compatibility table from the results the last
    /// matrix run left (`cargo xtask test --matrix` does this itself).
    CompatTable,
    /// Build the eBPF object, first installing what it needs (nightly
    /// toolchain, rust-src, bpf-linker) if missing.
    BuildEbpf(ebpf::Options),
    /// Build everything and trace the bundled demo service for a few seconds,
    /// writing trace.pftrace (runs the tracer through sudo if not root).
    Demo(demo::Options),
    /// Check formatting (rustfmt) and lints (clippy, warnings denied) of every
    /// crate, the eBPF one included.
    Lint,
    /// Build the eBPF object, then run `cargo test --workspace` with the test
    /// binaries run as root (through sudo if not root).
    Test(test::Options),
}

fn main() {
    // Errors are printed with their causes on one line and without anyhow's
    // backtrace: they are about the user's setup, not about xtask's code.
    if let Err(error) = run(Cli::parse().command) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::BuildEbpf(options) => {
            let object = ebpf::build(&options)?;
            println!("{}", object.display());
            Ok(())
        }
        Command::Bench(options) => bench::run(&options),
        Command::CompatTable => compat::write_table(),
        Command::CompatBuild { all } => compat::build(&if all {
            compat::all_cells()
        } else {
            compat::fast_cells()
        }),
        Command::Demo(options) => demo::run(&options),
        Command::Lint => lint::run(),
        Command::Test(options) => test::run(&options),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn test_args(args: &[&str]) -> Vec<String> {
        let argv = ["xtask", "test"].iter().chain(args);
        match Cli::parse_from(argv).command {
            Command::Test(options) => options.cargo_args,
            _ => unreachable!("parsed as the test command"),
        }
    }

    #[test]
    fn test_passes_its_arguments_to_cargo() {
        // `cargo xtask test -- --test trace` reaches us as `test -- --test trace`.
        assert_eq!(test_args(&["--", "--test", "trace"]), ["--test", "trace"]);
        assert_eq!(
            test_args(&["--test", "trace", "--", "--nocapture"]),
            ["--test", "trace", "--", "--nocapture"]
        );
        assert!(test_args(&[]).is_empty());
    }
}

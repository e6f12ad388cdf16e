//! The compatibility matrix as data: which tokio versions and build profiles
//! the compat service is built with, how each is built, which features each
//! cell is checked for, and — for the cells where a feature cannot work —
//! why. Shared by the matrix test (`tests/compat.rs`), which builds and
//! traces the cells, and by `cargo xtask test --matrix`, which writes the
//! README's table from the results. std only: both include this file.
//!
//! Why a table of known gaps rather than a looser test: every cell asserts
//! every feature; a feature that is missing must be listed here with its
//! reason, and a listed gap that starts working fails the cell too, so the
//! README table can never claim less (or more) than the tool does.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tokio release line: the newest patch of `requirement` (a cargo version
/// requirement), with `pins` (`cargo update -p CRATE --precise VERSION`)
/// applied after the lock file is made, for dependencies whose newest
/// compatible release no longer builds with today's rustc.
#[derive(Clone, Copy, Debug)]
pub struct Version {
    pub label: &'static str,
    pub requirement: &'static str,
    pub pins: &'static [(&'static str, &'static str)],
}

/// Every tokio line of the matrix, oldest first; the last is the newest.
pub const VERSIONS: &[Version] = &[
    version("1.8", "~1.8"),
    version("1.14", "~1.14"),
    version("1.20", "~1.20"),
    version("1.25", "~1.25"),
    version("1.28", "~1.28"),
    version("1.32", "~1.32"),
    version("1.36", "~1.36"),
    version("1.38", "~1.38"),
    version("1.41", "~1.41"),
    version("1.45", "~1.45"),
    version("1.48", "~1.48"),
    version("1.54", "~1.54"),
];

const fn version(label: &'static str, requirement: &'static str) -> Version {
    Version {
        label,
        requirement,
        pins: &[],
    }
}

pub fn latest() -> Version {
    VERSIONS[VERSIONS.len() - 1]
}

/// The runtime flavour the service starts (its first argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Multi,
    Current,
}

impl Flavour {
    pub fn arg(self) -> &'static str {
        match self {
            Flavour::Multi => "multi",
            Flavour::Current => "current",
        }
    }
}

/// One way users build: lines for the `[profile.*]` table, extra rustc
/// flags, and whether it is cargo's dev profile.
#[derive(Clone, Copy, Debug)]
pub struct BuildProfile {
    pub label: &'static str,
    pub toml: &'static str,
    pub rustflags: &'static [&'static str],
    pub dev: bool,
    /// Does the binary carry line tables (file:line in `waits_at`)?
    pub line_tables: bool,
}

const fn profile(label: &'static str, toml: &'static str, line_tables: bool) -> BuildProfile {
    BuildProfile {
        label,
        toml,
        rustflags: &[],
        dev: false,
        line_tables,
    }
}

/// The default release profile: every version is built this way.
pub const RELEASE: BuildProfile = profile("release", "", false);

/// The profiles the newest tokio is built with too.
pub const PROFILES: &[BuildProfile] = &[
    RELEASE,
    profile("line-tables-only", "debug = \"line-tables-only\"\n", true),
    profile("debug = true", "debug = true\n", true),
    profile(
        "fat LTO, cgu=1",
        "lto = \"fat\"\ncodegen-units = 1\n",
        false,
    ),
    profile("opt-level = s", "opt-level = \"s\"\n", false),
    profile("panic = abort", "panic = \"abort\"\n", false),
    BuildProfile {
        label: "frame pointers",
        toml: "",
        rustflags: &["-C", "force-frame-pointers=yes"],
        dev: false,
        line_tables: false,
    },
    BuildProfile {
        label: "dev",
        toml: "",
        rustflags: &[],
        dev: true,
        line_tables: true,
    },
    profile(
        "strip = debuginfo",
        "debug = true\nstrip = \"debuginfo\"\n",
        false,
    ),
    profile(
        "split debuginfo",
        "debug = true\nsplit-debuginfo = \"packed\"\n",
        true,
    ),
];

/// One cell: a version, a flavour, a profile.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    pub version: Version,
    pub flavour: Flavour,
    pub profile: BuildProfile,
}

impl Cell {
    /// A name usable as a directory and a test filter, e.g. `1.8-current-release`.
    pub fn slug(&self) -> String {
        let profile: String = self
            .profile
            .label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        format!("{}-{}-{}", self.version.label, self.flavour.arg(), profile)
    }

    /// The build's name: the service takes its flavour as an argument, so
    /// both flavours of a version and profile share one build.
    pub fn build_slug(&self) -> String {
        let slug = self.slug();
        slug.replacen(&format!("-{}-", self.flavour.arg()), "-", 1)
    }

    pub fn version_at_least(&self, minor: u32) -> bool {
        minor_of(self.version.label) >= minor
    }
}

pub fn minor_of(label: &str) -> u32 {
    label
        .split('.')
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// The whole matrix: every version × both flavours in the release profile,
/// then the newest version's other profiles (multi-thread).
pub fn all_cells() -> Vec<Cell> {
    let mut cells = Vec::new();
    for &version in VERSIONS {
        for flavour in [Flavour::Multi, Flavour::Current] {
            cells.push(Cell {
                version,
                flavour,
                profile: RELEASE,
            });
        }
    }
    for &profile in &PROFILES[1..] {
        cells.push(Cell {
            version: latest(),
            flavour: Flavour::Multi,
            profile,
        });
    }
    // Where frame pointers once put a poll's return site on alignment
    // padding the kernel refused to probe (tokio 1.28).
    let frame_pointers = PROFILES
        .iter()
        .find(|profile| profile.label == "frame pointers")
        .copied()
        .expect("the frame pointers profile");
    let v1_28 = VERSIONS
        .iter()
        .find(|version| version.label == "1.28")
        .copied()
        .expect("tokio 1.28 in the matrix");
    cells.push(Cell {
        version: v1_28,
        flavour: Flavour::Multi,
        profile: frame_pointers,
    });
    // Where `opt-level = "s"` called tokio's task machinery through GOT
    // slots (task types and the blocking pool unnamed) and kept half of
    // the 1.54-style spawn pair (no multi-thread spawns): tokio 1.28.
    let opt_s = PROFILES
        .iter()
        .find(|profile| profile.label == "opt-level = s")
        .copied()
        .expect("the opt-level = s profile");
    cells.push(Cell {
        version: v1_28,
        flavour: Flavour::Multi,
        profile: opt_s,
    });
    cells
}

/// The cells `cargo xtask test` runs every time (the matrix's corners).
pub fn fast_cells() -> Vec<Cell> {
    all_cells()
        .into_iter()
        .filter(|cell| {
            matches!(
                (cell.version.label, cell.flavour, cell.profile.label),
                ("1.8", Flavour::Multi, "release")
                    | ("1.38", Flavour::Current, "release")
                    | ("1.54", Flavour::Multi, "release")
            )
        })
        .collect()
}

/// What a trace of the compat service is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Feature {
    /// Poll slices named after the fixture's task types.
    Polls,
    /// Park slices.
    Parks,
    /// Polls carrying tokio's task id.
    TaskIds,
    /// Spawn instants.
    Spawns,
    /// Task-end instants.
    Ends,
    /// Wake-to-poll flows.
    Wakes,
    /// Worker unparks (multi-thread only).
    Unparks,
    /// `spawn_blocking` work on blocking-pool tracks.
    Blocking,
    /// `waits_at` names one of the fixture's own async fns.
    WaitsAt,
    /// `waits_at` has file:line (builds with line tables only).
    FileLine,
    /// `waits_on` names the tokio primitive (timer, socket, Notify,
    /// JoinHandle…), and never one the task does not use.
    WaitsOn,
    /// CPU samples attributed to the task running.
    Samples,
    /// The `block_on` root future's polls on its thread.
    BlockOnRoot,
    /// `watch --pid`: per-second health with each worker's busy share, and
    /// CPU attributed to the spinning task's type, without a poll probe.
    Watch,
}

pub const FEATURES: &[Feature] = &[
    Feature::Polls,
    Feature::Parks,
    Feature::TaskIds,
    Feature::Spawns,
    Feature::Ends,
    Feature::Wakes,
    Feature::Unparks,
    Feature::Blocking,
    Feature::WaitsAt,
    Feature::FileLine,
    Feature::WaitsOn,
    Feature::Samples,
    Feature::BlockOnRoot,
    Feature::Watch,
];

impl Feature {
    pub fn name(self) -> &'static str {
        match self {
            Feature::Polls => "polls",
            Feature::Parks => "parks",
            Feature::TaskIds => "task ids",
            Feature::Spawns => "spawns",
            Feature::Ends => "ends",
            Feature::Wakes => "wakes",
            Feature::Unparks => "unparks",
            Feature::Blocking => "blocking",
            Feature::WaitsAt => "waits_at",
            Feature::FileLine => "file:line",
            Feature::WaitsOn => "waits_on",
            Feature::Samples => "samples",
            Feature::BlockOnRoot => "block_on root",
            Feature::Watch => "watch",
        }
    }

    /// Whether the feature means anything for this cell (a current-thread
    /// runtime has no workers to unpark; a build without line tables has
    /// no file:line to show).
    pub fn applies(self, cell: &Cell) -> bool {
        match self {
            Feature::Unparks => cell.flavour == Flavour::Multi,
            Feature::FileLine => cell.profile.line_tables,
            _ => true,
        }
    }
}

/// A feature known not to work in some cells, and why: the note the README
/// table shows. `applies` picks the cells.
pub struct Gap {
    pub feature: Feature,
    pub applies: fn(&Cell) -> bool,
    pub why: &'static str,
}

/// The gaps, as the tracer stands. Each one is checked: a gap whose feature
/// turns out to work fails its cell until the entry is removed.
pub const GAPS: &[Gap] = &[
    Gap {
        feature: Feature::TaskIds,
        applies: |cell| !cell.version_at_least(23),
        why: "tokio < 1.23 keeps no task id where it can be read: none before 1.21, and in 1.21–1.22 \
              it sits in the task's `Core` at an offset that depends on the future's type",
    },
    Gap {
        feature: Feature::Parks,
        applies: |cell| cell.flavour == Flavour::Current && !cell.version_at_least(17),
        why: "tokio < 1.17's current-thread scheduler (`basic_scheduler`) parks its driver from \
              inside `block_on`: it has no park function of its own to probe",
    },
    Gap {
        feature: Feature::Watch,
        applies: |cell| cell.flavour == Flavour::Current && !cell.version_at_least(17),
        why: "the watch tier tells a worker by its park probe, and tokio < 1.17's current-thread \
              scheduler has no park function to probe (see parks): its CPU is attributed to task \
              types, but the thread has no busy share, hogs or blocking findings",
    },
    Gap {
        feature: Feature::BlockOnRoot,
        applies: |cell| cell.flavour == Flavour::Multi && !cell.version_at_least(20),
        why: "tokio 1.8 and 1.14's `block_on` loop calls the thread parker's `Inner::park` itself \
              (its `CachedParkThread::park` is inlined), so a loop entered before tracing began \
              (`--pid`) is not told from other parker users, and it polls its future through \
              `<&mut F as Future>::poll`, so the root's type is not in the symbols",
    },
    Gap {
        feature: Feature::BlockOnRoot,
        applies: |cell| cell.flavour == Flavour::Current && !cell.version_at_least(20),
        why: "tokio 1.8 and 1.14's current-thread scheduler (`basic_scheduler`) polls its root \
              future inline in its `block_on`, with no function of its own around the poll",
    },
    Gap {
        feature: Feature::BlockOnRoot,
        applies: |cell| cell.profile.label == "fat LTO, cgu=1",
        why: "fat LTO inlines the `block_on` loop and its park method into `main`: no function \
              of theirs is left to probe (the parker's `Inner::park` is, but other threads use \
              it too)",
    },
];

/// The gap for `feature` in `cell`, if one is listed.
pub fn gap(cell: &Cell, feature: Feature) -> Option<&'static Gap> {
    GAPS.iter()
        .find(|gap| gap.feature == feature && (gap.applies)(cell))
}

/// Where a cell's build lives: `tests/compat/target-<build slug>`
/// (gitignored), shared by both flavours.
pub fn cell_dir(repo: &Path, cell: &Cell) -> PathBuf {
    repo.join("tests/compat")
        .join(format!("target-{}", cell.build_slug()))
}

/// Where the matrix test leaves a cell's results for the README table.
pub fn result_file(repo: &Path, cell: &Cell) -> PathBuf {
    cell_dir(repo, cell).join(format!("result-{}.tsv", cell.flavour.arg()))
}

/// The service binary of a built cell.
pub fn binary(repo: &Path, cell: &Cell) -> PathBuf {
    let profile_dir = if cell.profile.dev { "debug" } else { "release" };
    cell_dir(repo, cell)
        .join("target")
        .join(profile_dir)
        .join("compat-service")
}

/// Builds the compat service for `cell` (a no-op when cargo finds it up to
/// date): writes the cell's manifest, makes its lock file once with the
/// version's pins, and runs `cargo build`. `cargo` is the cargo to run.
pub fn build(repo: &Path, cell: &Cell, cargo: &Path) -> Result<PathBuf, String> {
    let dir = cell_dir(repo, cell);
    std::fs::create_dir_all(dir.join(".cargo")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let source = repo.join("tests/compat/src/main.rs");
    let profile_name = if cell.profile.dev { "dev" } else { "release" };
    let manifest = format!(
        "# Written by tests/compat/matrix.rs: the compat service against tokio {req}.\n\
         [workspace]\n\n[package]\nname = \"compat-service\"\nversion = \"0.1.0\"\n\
         edition = \"2021\"\npublish = false\n\n[[bin]]\nname = \"compat-service\"\n\
         path = {source:?}\n\n[dependencies]\ntokio = {{ version = \"{req}\", features = \
         [\"rt\", \"rt-multi-thread\", \"time\", \"sync\", \"macros\", \"net\", \"io-util\"] }}\n\n\
         [profile.{profile_name}]\n{toml}",
        req = cell.version.requirement,
        source = source.display().to_string(),
        toml = cell.profile.toml,
    );
    write_if_changed(&dir.join("Cargo.toml"), &manifest)?;
    let flags: Vec<String> = cell
        .profile
        .rustflags
        .iter()
        .map(|f| format!("{f:?}"))
        .collect();
    let config = format!("[build]\nrustflags = [{}]\n", flags.join(", "));
    write_if_changed(&dir.join(".cargo/config.toml"), &config)?;
    let cargo_in = |args: &[&str]| {
        let mut command = Command::new(cargo);
        command
            .args(args)
            .current_dir(&dir)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR");
        command
    };
    let run = |mut command: Command| -> Result<(), String> {
        let output = command
            .output()
            .map_err(|e| format!("could not run cargo: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`cargo {:?}` in {} failed:\n{}",
                command.get_args().collect::<Vec<_>>(),
                dir.display(),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    };
    if !dir.join("Cargo.lock").exists() {
        run(cargo_in(&["generate-lockfile", "--quiet"]))?;
        for (krate, precise) in cell.version.pins {
            run(cargo_in(&[
                "update",
                "--quiet",
                "-p",
                krate,
                "--precise",
                precise,
            ]))?;
        }
    }
    let mut build = vec!["build", "--quiet"];
    if !cell.profile.dev {
        build.push("--release");
    }
    run(cargo_in(&build))?;
    Ok(binary(repo, cell))
}

fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

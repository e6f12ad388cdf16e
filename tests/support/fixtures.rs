//! The fixture programs (`tests/fixtures`): the profiles they are built in
//! and building them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The ways each fixture is built: cargo's default release profile, and fat
/// LTO with one codegen unit and `panic = "abort"`; and the same two with
/// debug info (`debug = "limited"`: line tables and full function paths,
/// still no frame pointers) for the tests that expect file:line in stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Release,
    Lto,
    ReleaseDebug,
    LtoDebug,
}

impl Profile {
    /// Every profile the fixtures are built in: `cargo xtask test` builds
    /// them all up front; tests/fixtures/Cargo.toml declares the same ones
    /// (a test below checks).
    pub const EVERY: [Profile; 4] = [
        Profile::Release,
        Profile::Lto,
        Profile::ReleaseDebug,
        Profile::LtoDebug,
    ];
    /// The profiles every test runs in: how users ship, without debug info.
    pub const ALL: [Profile; 2] = [Profile::Release, Profile::Lto];
    /// The profiles with line tables, built only when a test asks for one.
    pub const WITH_DEBUG_INFO: [Profile; 2] = [Profile::ReleaseDebug, Profile::LtoDebug];

    /// The profile's name for cargo's `--profile`.
    pub fn cargo_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Lto => "lto",
            Profile::ReleaseDebug => "release-debug",
            Profile::LtoDebug => "lto-debug",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

pub fn repo_root() -> PathBuf {
    // This crate is tests/support.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/support is two levels down")
        .to_path_buf()
}

fn fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// Builds all fixtures in `profile` (once per profile and test process, when
/// first asked for; cargo's own lock serialises builds) and returns the path
/// of one of them.
pub fn fixture(name: &str, profile: Profile) -> PathBuf {
    static BUILT: [OnceLock<()>; 4] = [const { OnceLock::new() }; 4];
    BUILT[profile.index()].get_or_init(|| {
        build_fixtures(
            &["--profile", profile.cargo_name()],
            &[],
            &format!("{profile:?}"),
        );
    });
    let path = fixtures_dir()
        .join("target")
        .join(profile.cargo_name())
        .join(name);
    assert!(path.exists(), "fixture {} was not built", path.display());
    path
}

/// Builds the fixtures once more in cargo's release profile with `env` set
/// (e.g. more debug info, another symbol mangling), into their own target
/// directory `tests/fixtures/target/<target_subdir>`, and returns the
/// directory the programs are in.
pub fn fixture_variant(target_subdir: &str, env: &[(&str, &str)]) -> PathBuf {
    let target_dir = fixtures_dir().join("target").join(target_subdir);
    let target_arg = target_dir.to_str().expect("a UTF-8 path");
    build_fixtures(
        &["--release", "--target-dir", target_arg],
        env,
        target_subdir,
    );
    target_dir.join("release")
}

/// Runs cargo on the fixtures workspace with `args`, in a clean
/// environment plus `env`.
fn build_fixtures(args: &[&str], env: &[(&str, &str)], what: &str) {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet"])
        .args(args)
        .arg("--manifest-path")
        .arg(fixtures_dir().join("Cargo.toml"))
        // The fixtures must be built the way users build: no flags
        // inherited from whatever runs the tests.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .envs(env.iter().copied())
        .status()
        .expect("run cargo to build the fixtures");
    assert!(status.success(), "building the fixtures ({what}) failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/fixtures/Cargo.toml declares every custom profile of the list
    /// and no other (`release` is cargo's own).
    #[test]
    fn the_fixtures_declare_the_profiles_of_the_list() {
        let manifest = std::fs::read_to_string(fixtures_dir().join("Cargo.toml")).unwrap();
        let mut declared: Vec<&str> = manifest
            .lines()
            .filter_map(|line| line.trim().strip_prefix("[profile.")?.strip_suffix(']'))
            .collect();
        declared.sort_unstable();
        let mut listed: Vec<&str> = Profile::EVERY
            .iter()
            .map(|profile| profile.cargo_name())
            .filter(|name| *name != "release")
            .collect();
        listed.sort_unstable();
        assert_eq!(declared, listed);
    }
}

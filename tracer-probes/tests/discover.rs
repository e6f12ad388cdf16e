//! `discover` on the real fixture programs: the probe sites, their file
//! offsets and instructions, and the task type names.

use test_support as support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use object::{Object, ObjectSection, ObjectSegment};
use support::Profile;
use tracer_probes::{NameSource, ProbePlan, SiteKind, discover, write_table};

fn plan_for(path: &Path) -> ProbePlan {
    let plan =
        discover(path).unwrap_or_else(|error| panic!("discover {}: {error:#}", path.display()));
    // Shown with `--nocapture`; also checks the table writes.
    let mut table = Vec::new();
    write_table(&plan, &mut table).expect("write table");
    println!("{}", String::from_utf8_lossy(&table));
    plan
}

fn task_names(plan: &ProbePlan) -> Vec<String> {
    plan.sites
        .iter()
        .filter(|site| site.kind == SiteKind::Poll)
        .filter_map(|site| site.task_type.as_ref().map(|task| task.full.clone()))
        .collect()
}

fn park_symbols(plan: &ProbePlan) -> Vec<&str> {
    plan.sites
        .iter()
        .filter(|site| site.kind == SiteKind::Park)
        .map(|site| site.symbol.as_str())
        .collect()
}

/// Asserts that, for every expected fixture function, some poll site's task
/// type names it, with the given source.
fn assert_names_tasks(plan: &ProbePlan, functions: &[&str], source: NameSource) {
    for function in functions {
        let site = plan
            .sites
            .iter()
            .find(|site| {
                site.task_type
                    .as_ref()
                    .is_some_and(|task| task.full.contains(function))
            })
            .unwrap_or_else(|| {
                panic!(
                    "no poll site named {function}; names: {:?}",
                    task_names(plan)
                )
            });
        let task = site.task_type.as_ref().unwrap();
        assert_eq!(task.source, source, "{function}: {task:?}");
        assert!(
            task.short.contains(function),
            "short name {:?} lost the function name",
            task.short
        );
        assert!(task.short.len() <= task.full.len());
    }
}

const MULTI_WORKER_TASKS: &[&str] = &["fixture_busy_task", "fixture_sleeper", "fixture_yielder"];
const CURRENT_THREAD_TASKS: &[&str] = &["fixture_ticker", "fixture_short_spinner"];
const MULTI_THREAD_PARK: &str =
    "tokio::runtime::scheduler::multi_thread::worker::Context::park_internal";
const CURRENT_THREAD_PARK: &str =
    "tokio::runtime::scheduler::current_thread::Context::park_internal";

#[test]
fn multi_worker_polls_and_parks_in_both_profiles() {
    for profile in Profile::ALL {
        let plan = plan_for(&support::fixture("multi_worker", profile));
        let polls = plan
            .sites
            .iter()
            .filter(|site| site.kind == SiteKind::Poll)
            .count();
        assert!(polls >= 3, "{profile:?}: only {polls} poll sites");
        assert_names_tasks(&plan, MULTI_WORKER_TASKS, NameSource::Symbols);
        assert!(
            park_symbols(&plan).contains(&MULTI_THREAD_PARK),
            "{profile:?}: {:?}",
            park_symbols(&plan)
        );
        // `park` and `park_yield` call `park_internal`: probing them too would double count.
        assert!(
            !park_symbols(&plan)
                .iter()
                .any(|symbol| symbol.ends_with("Context::park"))
        );
        assert!(!plan.stripped);
        assert_eq!(
            plan.tokio_version
                .as_deref()
                .map(|v| v.starts_with("1.54.")),
            Some(true)
        );
        assert_eq!(plan.task_id_layout.enabled, 1);
        assert_eq!(
            (
                plan.task_id_layout.vtable_offset,
                plan.task_id_layout.id_offset_slot
            ),
            (16, 9)
        );
    }
}

#[test]
fn current_thread_polls_and_parks_in_both_profiles() {
    for profile in Profile::ALL {
        let plan = plan_for(&support::fixture("current_thread", profile));
        assert_names_tasks(&plan, CURRENT_THREAD_TASKS, NameSource::Symbols);
        assert!(
            park_symbols(&plan).contains(&CURRENT_THREAD_PARK),
            "{profile:?}: {:?}",
            park_symbols(&plan)
        );
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }
}

/// The `merged` fixture's three futures compile to the same code. Where
/// the binary still names all three (LLVM's merged functions kept as
/// aliases: the release profile), every site says all three rather than
/// one; under fat LTO the merged functions and their other names are gone
/// from the binary, so one name is all it holds (a known gap, NOTES.md
/// "issue 12": if this starts naming the others, update both).
#[test]
fn identical_futures_are_named_together_where_the_binary_names_them() {
    let twins = ["fixture_twin_a", "fixture_twin_b", "fixture_twin_c"];
    let release = task_names(&plan_for(&support::fixture("merged", Profile::Release)));
    let release: Vec<&String> = release
        .iter()
        .filter(|n| n.contains("fixture_twin"))
        .collect();
    assert_eq!(release.len(), 6, "3 types x 2 schedulers: {release:?}");
    for name in release {
        assert!(twins.iter().all(|twin| name.contains(twin)), "{name}");
    }
    let lto = task_names(&plan_for(&support::fixture("merged", Profile::Lto)));
    let lto: Vec<&String> = lto.iter().filter(|n| n.contains("fixture_twin")).collect();
    assert_eq!(lto.len(), 2, "one merged raw::poll per scheduler: {lto:?}");
    for name in lto {
        let named = twins.iter().filter(|twin| name.contains(*twin)).count();
        assert_eq!(named, 1, "{name}: the gap closed? update NOTES.md");
    }
}

#[test]
fn release_poll_sites_are_thunks_and_the_blocking_pool_task_is_named() {
    let plan = plan_for(&support::fixture("multi_worker", Profile::Release));
    for site in plan.sites.iter().filter(|site| site.kind == SiteKind::Poll) {
        assert_eq!(site.symbol, "tokio::runtime::task::raw::poll");
        let task = site
            .task_type
            .as_ref()
            .unwrap_or_else(|| panic!("unnamed poll site {site:?}"));
        // Without LTO, `raw::poll` of an async fn is a 5-byte `jmp Harness<T,S>::poll`.
        if task.full.starts_with("multi_worker::") {
            assert!(site.first_instruction.starts_with("jmp "), "{site:?}");
        }
    }
    // Named, and skipped as a runtime thread's whole life.
    let skipped: Vec<String> = plan
        .skipped
        .iter()
        .filter_map(|(site, _)| site.task_type.as_ref().map(|task| task.full.clone()))
        .collect();
    assert!(
        skipped.iter().any(|name| name.contains("BlockingTask<")),
        "{skipped:?}"
    );
}

#[test]
fn sites_are_distinct_and_file_offsets_point_at_the_function_bytes() {
    for name in ["multi_worker", "current_thread"] {
        for profile in Profile::ALL {
            let path = support::fixture(name, profile);
            let plan = plan_for(&path);
            let data = std::fs::read(&path).unwrap();
            let file = object::File::parse(&*data).unwrap();
            let mut addresses: Vec<u64> = plan.sites.iter().map(|site| site.address).collect();
            addresses.sort();
            addresses.dedup();
            assert_eq!(
                addresses.len(),
                plan.sites.len(),
                "two sites share an address"
            );

            for site in &plan.sites {
                // Same offset as the kernel computes from the PT_LOAD segment.
                let segment = file
                    .segments()
                    .find(|segment| {
                        let (_, file_size) = segment.file_range();
                        site.address >= segment.address()
                            && site.address < segment.address() + file_size
                    })
                    .expect("a loaded segment holds the site");
                assert_eq!(
                    site.file_offset,
                    site.address - segment.address() + segment.file_range().0
                );
                // And the bytes there are the section's bytes at that address.
                let section = file
                    .sections()
                    .find(|s| site.address >= s.address() && site.address < s.address() + s.size())
                    .expect("a section holds the site");
                let in_section =
                    &section.data().unwrap()[(site.address - section.address()) as usize..][..8];
                let in_file = &data[site.file_offset as usize..][..8];
                assert_eq!(in_section, in_file, "{site:?}");
                assert_ne!(site.first_instruction, "?", "{site:?}");
            }
        }
    }
}

fn dwarf_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| support::fixture_variant("dwarf", &[("CARGO_PROFILE_RELEASE_DEBUG", "2")]))
}

#[test]
fn debug_info_names_tasks_from_dwarf() {
    let plan = plan_for(&dwarf_fixtures().join("multi_worker"));
    assert_names_tasks(&plan, MULTI_WORKER_TASKS, NameSource::Dwarf);
    // The full path comes from the namespaces around the type, e.g.
    // `multi_worker::fixture_sleeper::{async_fn_env#0}`.
    let names = task_names(&plan);
    assert!(
        names
            .iter()
            .any(|name| name == "multi_worker::fixture_sleeper::{async_fn_env#0}"),
        "{names:?}"
    );
    let plan = plan_for(&dwarf_fixtures().join("current_thread"));
    assert_names_tasks(&plan, CURRENT_THREAD_TASKS, NameSource::Dwarf);
}

#[test]
fn v0_mangling_names_tasks_from_the_poll_symbol() {
    let dir = support::fixture_variant("v0", &[("RUSTFLAGS", "-C symbol-mangling-version=v0")]);
    let plan = plan_for(&dir.join("multi_worker"));
    assert_names_tasks(&plan, MULTI_WORKER_TASKS, NameSource::Symbols);
    assert!(
        park_symbols(&plan)
            .iter()
            .any(|symbol| symbol.contains("park_internal")),
        "{:?}",
        park_symbols(&plan)
    );
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn stripped_binary_is_reported_as_stripped() {
    let stripped = scratch_dir("stripped").join("multi_worker");
    let status = Command::new("objcopy")
        .arg("--strip-all")
        .arg(support::fixture("multi_worker", Profile::Release))
        .arg(&stripped)
        .status()
        .expect("run objcopy");
    assert!(status.success());
    let error = format!("{:#}", discover(&stripped).unwrap_err());
    assert!(
        error.contains("is stripped: it has no symbol table (.symtab)"),
        "{error}"
    );
    assert!(error.contains(&stripped.display().to_string()), "{error}");
}

#[test]
fn non_tokio_binary_is_reported_as_not_tokio() {
    // This test binary: Rust, with symbols, no tokio.
    let me = std::env::current_exe().unwrap();
    let error = format!("{:#}", discover(&me).unwrap_err());
    assert!(
        error.contains("does not look like a tokio program"),
        "{error}"
    );
    assert!(
        error.contains("tokio::runtime::scheduler::current_thread::Context::park_internal"),
        "{error}"
    );
}

#[test]
fn non_elf_and_missing_files_give_clear_errors() {
    let text = scratch_dir("not_elf").join("notes.txt");
    std::fs::write(&text, "just some text, long enough to look like a header\n").unwrap();
    let error = format!("{:#}", discover(&text).unwrap_err());
    assert!(error.contains("is not an ELF file"), "{error}");

    let missing = scratch_dir("missing").join("no_such_binary");
    let error = format!("{:#}", discover(&missing).unwrap_err());
    assert!(
        error.contains("cannot read") && error.contains("no_such_binary"),
        "{error}"
    );
}

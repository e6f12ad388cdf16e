//! Checks made before anything is loaded, so that a missing privilege or
//! kernel feature is reported as such instead of as an obscure `EPERM` from
//! deep inside a `bpf()` call.

use std::path::Path;

use anyhow::{Result, bail};

/// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Fails unless this process may load eBPF programs and open uprobe perf
/// events, naming what is missing.
///
/// Measured on Linux 6.18 with capsh: the uprobe perf events need
/// CAP_SYS_ADMIN; CAP_BPF + CAP_PERFMON get `EACCES` from `perf_event_open`.
/// Linux 5.8 let CAP_PERFMON open them, and 6.16 reverted that ("perf: Revert
/// to requiring CAP_SYS_ADMIN for uprobes", also in the stable kernels), so
/// CAP_SYS_ADMIN is what works everywhere; it also covers loading the
/// programs (CAP_BPF) and the CPU sampling (CAP_PERFMON).
pub fn check_privileges() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = parse_cap_eff(&status).unwrap_or(0);
    missing_privileges(effective)
}

fn missing_privileges(effective: u64) -> Result<()> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    let what = if effective == 0 {
        "it has no capabilities"
    } else if has(CAP_BPF) && has(CAP_PERFMON) {
        "CAP_BPF and CAP_PERFMON are not enough"
    } else {
        "CAP_SYS_ADMIN is missing"
    };
    bail!(
        "rt-ebpf-trace needs root (the capability CAP_SYS_ADMIN: the kernel lets only it \
         attach uprobes) and {what}; run it with sudo"
    )
}

/// Reads the `CapEff:` line of /proc/self/status (a hex bit mask).
fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// Where the kernel advertises what we need; a parameter so tests can point
/// it at a directory that lacks them.
pub struct KernelPaths<'a> {
    /// The kernel's own BTF, which tells the eBPF loader the kernel's types.
    pub btf: &'a Path,
    /// The uprobe perf event source.
    pub uprobe_pmu: &'a Path,
}

impl KernelPaths<'static> {
    pub fn system() -> Self {
        KernelPaths {
            btf: Path::new("/sys/kernel/btf/vmlinux"),
            uprobe_pmu: Path::new("/sys/bus/event_source/devices/uprobe/type"),
        }
    }
}

/// Fails with a specific message when the kernel lacks BTF or uprobes.
pub fn check_kernel(paths: &KernelPaths) -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    if !paths.uprobe_pmu.exists() {
        bail!(
            "this kernel ({release}) has no uprobe support ({} is missing): \
             rt-ebpf-trace needs a kernel built with CONFIG_UPROBE_EVENTS",
            paths.uprobe_pmu.display()
        );
    }
    if !paths.btf.exists() {
        bail!(
            "this kernel ({release}) does not expose BTF type information ({} is missing): \
             rt-ebpf-trace needs a kernel built with CONFIG_DEBUG_INFO_BTF (Linux 5.8 or later)",
            paths.btf.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cap_sys_admin_attaches_uprobes() {
        assert!(missing_privileges(1 << CAP_SYS_ADMIN).is_ok());
        let bpf_perfmon = missing_privileges((1 << CAP_BPF) | (1 << CAP_PERFMON)).unwrap_err();
        assert!(bpf_perfmon.to_string().contains("CAP_SYS_ADMIN"));
        assert!(bpf_perfmon.to_string().contains("not enough"));
        let none = missing_privileges(0).unwrap_err().to_string();
        assert!(
            none.contains("needs root") && none.contains("CAP_SYS_ADMIN"),
            "{none}"
        );
    }

    #[test]
    fn reads_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn kernel_without_uprobes_or_btf_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("rt-ebpf-trace-kernel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let present = dir.join("present");
        std::fs::write(&present, "1").unwrap();
        let missing = dir.join("missing");

        let no_btf = check_kernel(&KernelPaths {
            btf: &missing,
            uprobe_pmu: &present,
        });
        assert!(no_btf.unwrap_err().to_string().contains("BTF"));
        let no_uprobes = check_kernel(&KernelPaths {
            btf: &present,
            uprobe_pmu: &missing,
        });
        assert!(no_uprobes.unwrap_err().to_string().contains("uprobe"));
        assert!(
            check_kernel(&KernelPaths {
                btf: &present,
                uprobe_pmu: &present
            })
            .is_ok()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Kernel function names for the kernel stacks the watch tier captures,
//! from `/proc/kallsyms` (root sees the real addresses; others see zeros,
//! and then kernel frames are shown as `[kernel]`).

/// Functions that only say "the thread went off CPU" or "a BPF program
/// ran": skipped when naming where a thread blocked.
const MACHINERY: &[&str] = &[
    "bpf_",
    "__bpf",
    "__traceiter_",
    "trace_",
    "perf_",
    "__schedule",
    "schedule",
    "preempt_schedule",
    "__cond_resched",
    "__sched_text",
];

pub struct KernelSymbols {
    /// (address, name), sorted by address; empty when the addresses are hidden.
    symbols: Vec<(u64, String)>,
}

impl KernelSymbols {
    pub fn load() -> Self {
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let address = u64::from_str_radix(fields.next()?, 16).ok()?;
                let kind = fields.next()?;
                let name = fields.next()?;
                let is_code = matches!(kind, "t" | "T" | "w" | "W");
                (is_code && address != 0).then(|| (address, name.to_string()))
            })
            .collect();
        symbols.sort_unstable_by_key(|(address, _)| *address);
        KernelSymbols { symbols }
    }

    /// The function containing `address`, or `[kernel]`.
    pub fn name(&self, address: u64) -> &str {
        let at = self.symbols.partition_point(|(start, _)| *start <= address);
        match at.checked_sub(1) {
            Some(i) => &self.symbols[i].1,
            None => "[kernel]",
        }
    }
}

/// Is this kernel function scheduling or tracing machinery rather than
/// what the thread was doing?
pub fn is_machinery(name: &str) -> bool {
    MACHINERY.iter().any(|prefix| name.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KALLSYMS: &str = "ffffffff81000000 T _stext\n\
        ffffffff81100000 t futex_wait_queue\n\
        ffffffff81100200 T __schedule\n\
        ffffffff81200000 d some_data\n";

    #[test]
    fn names_the_function_an_address_is_in() {
        let symbols = KernelSymbols::parse(KALLSYMS);
        assert_eq!(symbols.name(0xffffffff81100010), "futex_wait_queue");
        assert_eq!(symbols.name(0xffffffff81100210), "__schedule");
        assert_eq!(symbols.name(0x1000), "[kernel]");
    }

    #[test]
    fn hidden_addresses_give_no_names() {
        let symbols = KernelSymbols::parse("0000000000000000 T _stext\n");
        assert_eq!(symbols.name(0xffffffff81100010), "[kernel]");
    }

    #[test]
    fn scheduler_frames_are_machinery() {
        assert!(is_machinery("__schedule"));
        assert!(is_machinery("schedule_hrtimeout_range"));
        assert!(!is_machinery("futex_wait_queue"));
        assert!(!is_machinery("do_nanosleep"));
    }
}

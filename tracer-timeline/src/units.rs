//! Figures as people read them: durations and sizes in the largest unit
//! that keeps them readable, shares in thousandths. Integer arithmetic
//! (u128, rounded half up), so the report says the same on every machine.

/// `part / whole` in thousandths, rounded; 0 when `whole` is 0.
pub(crate) fn permille(part: u128, whole: u128) -> u128 {
    if whole == 0 {
        return 0;
    }
    div_round(part * 1000, whole)
}

/// A duration in the largest unit that keeps it readable:
/// "850 ns", "12.3 µs", "45.0 ms", "2.50 s".
pub fn human_duration(ns: u64) -> String {
    let ns = u128::from(ns);
    if ns < 1_000 {
        return format!("{ns} ns");
    }
    // Round first, then pick the unit, so 999_960 ns reads "1.0 ms", not "1000.0 µs".
    let tenths_of_us = div_round(ns, 100);
    if tenths_of_us < 10_000 {
        return format!("{}.{} µs", tenths_of_us / 10, tenths_of_us % 10);
    }
    let tenths_of_ms = div_round(ns, 100_000);
    if tenths_of_ms < 10_000 {
        return format!("{}.{} ms", tenths_of_ms / 10, tenths_of_ms % 10);
    }
    let hundredths_of_s = div_round(ns, 10_000_000);
    format!("{}.{:02} s", hundredths_of_s / 100, hundredths_of_s % 100)
}

/// A file size, e.g. "512 B", "3.4 MB" (decimal units, like `ls -h --si`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut scale = 1000u128;
    let mut unit = 0;
    loop {
        let tenths = div_round(u128::from(bytes) * 10, scale);
        if tenths < 10_000 || unit == UNITS.len() - 1 {
            return format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit]);
        }
        scale *= 1000;
        unit += 1;
    }
}

/// `numerator / denominator`, rounded half up. u128 so callers can scale
/// any u64 without overflow.
pub(crate) fn div_round(numerator: u128, denominator: u128) -> u128 {
    (numerator + denominator / 2) / denominator
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(0), "0 ns");
        assert_eq!(human_duration(850), "850 ns");
        assert_eq!(human_duration(999), "999 ns");
        assert_eq!(human_duration(1_000), "1.0 µs");
        assert_eq!(human_duration(12_345), "12.3 µs");
        assert_eq!(
            human_duration(999_960),
            "1.0 ms",
            "rounding moves up a unit"
        );
        assert_eq!(human_duration(45_000_000), "45.0 ms");
        assert_eq!(human_duration(2_500_000_000), "2.50 s");
        assert_eq!(human_duration(3_600_000_000_000), "3600.00 s");
        assert_eq!(human_duration(u64::MAX), "18446744073.71 s");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1_500), "1.5 kB");
        assert_eq!(human_bytes(999_999), "1.0 MB");
        assert_eq!(human_bytes(4_567_890), "4.6 MB");
        assert_eq!(human_bytes(u64::MAX), "18446744.1 TB");
    }
}

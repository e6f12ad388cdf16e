//! A small fixed-precision histogram of durations, for percentiles of
//! scheduling delay without keeping every sample.
//!
//! Values below 32 ns get a bucket each; above that, every power of two is
//! split into 32 buckets, so a reported percentile is at most 1/32 (about 3%)
//! below the true value (it is the lowest value of its bucket: values that
//! are round numbers, like most test inputs, come out exact). The minimum and
//! maximum are kept exactly and bound every percentile. The bucket vector grows
//! only up to the largest value seen (under 2000 buckets for any `u64`), so
//! memory never depends on the number of samples.

/// Buckets per power of two, as a bit count: 2^5 = 32.
const SUB_BUCKET_BITS: u32 = 5;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, value: u64) {
        let bucket = bucket_of(value);
        if bucket >= self.counts.len() {
            self.counts.resize(bucket + 1, 0);
        }
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum += u128::from(value);
        self.min = if self.count == 1 {
            value
        } else {
            self.min.min(value)
        };
        self.max = self.max.max(value);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest sample, exactly; 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Sum of all samples (u128: a long trace's sum of ns may pass u64).
    pub fn sum(&self) -> u128 {
        self.sum
    }

    /// The value at `percent` (0..=100): the low end of the first bucket
    /// that holds at least that share of the samples, kept within the
    /// minimum and maximum. `None` when empty.
    pub fn percentile(&self, percent: u32) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        if percent >= 100 {
            return Some(self.max);
        }
        let percent = u128::from(percent);
        // ceil(count * percent / 100), and at least the first sample.
        let rank = (u128::from(self.count) * percent).div_ceil(100).max(1);
        let mut seen = 0u128;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += u128::from(count);
            if seen >= rank {
                return Some(bucket_lower_bound(bucket).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }

    /// Adds every sample of `other` to `self`.
    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.len() > self.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        if other.count > 0 {
            self.min = if self.count == 0 {
                other.min
            } else {
                self.min.min(other.min)
            };
        }
        self.count += other.count;
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }
}

fn bucket_of(value: u64) -> usize {
    if value < SUB_BUCKETS {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros(); // >= SUB_BUCKET_BITS here
    let shift = exponent - SUB_BUCKET_BITS;
    // The top SUB_BUCKET_BITS + 1 bits, minus the leading one.
    let mantissa = (value >> shift) - SUB_BUCKETS;
    (SUB_BUCKETS + u64::from(shift) * SUB_BUCKETS + mantissa) as usize
}

/// The smallest value that falls in `bucket`.
fn bucket_lower_bound(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB_BUCKETS {
        return bucket;
    }
    let shift = (bucket - SUB_BUCKETS) / SUB_BUCKETS;
    let mantissa = (bucket - SUB_BUCKETS) % SUB_BUCKETS;
    (SUB_BUCKETS + mantissa) << shift
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact() {
        let mut histogram = Histogram::new();
        for value in 1..=10 {
            histogram.record(value);
        }
        assert_eq!(histogram.percentile(50), Some(5));
        assert_eq!(histogram.percentile(90), Some(9));
        assert_eq!(histogram.percentile(100), Some(10));
        assert_eq!(histogram.percentile(0), Some(1));
        assert_eq!(
            (histogram.count(), histogram.max(), histogram.sum()),
            (10, 10, 55)
        );
    }

    #[test]
    fn large_values_stay_within_a_thirty_second() {
        let mut histogram = Histogram::new();
        // 1 µs .. 1000 µs in 1 µs steps: p50 is 500 µs, p99 990 µs.
        for us in 1..=1000u64 {
            histogram.record(us * 1000);
        }
        for (percent, exact) in [(50, 500_000u64), (90, 900_000), (99, 990_000)] {
            let got = histogram.percentile(percent).unwrap();
            assert!(
                got <= exact && got >= exact - exact / 32,
                "p{percent}: {got} vs {exact}"
            );
        }
        assert_eq!(
            histogram.percentile(100),
            Some(1_000_000),
            "the max is exact"
        );
    }

    #[test]
    fn every_bucket_starts_at_or_below_its_values() {
        for value in [
            0,
            31,
            32,
            33,
            63,
            64,
            65,
            1000,
            123_456_789,
            u64::MAX / 3,
            u64::MAX,
        ] {
            let bucket = bucket_of(value);
            assert!(bucket_lower_bound(bucket) <= value, "{value}");
            assert!(
                bucket_lower_bound(bucket + 1) > value || value == u64::MAX,
                "{value}"
            );
            assert!(value - bucket_lower_bound(bucket) <= value / 32, "{value}");
        }
    }

    #[test]
    fn identical_samples_come_out_exact() {
        let mut histogram = Histogram::new();
        for _ in 0..20 {
            histogram.record(407);
        }
        assert_eq!(histogram.percentile(50), Some(407));
        assert_eq!(histogram.percentile(99), Some(407));
    }

    #[test]
    fn empty_has_no_percentiles_and_merge_adds_up() {
        let mut a = Histogram::new();
        assert_eq!(a.percentile(50), None);
        let mut b = Histogram::new();
        b.record(7);
        b.record(5_000);
        a.record(3);
        a.merge(&b);
        assert_eq!((a.count(), a.max(), a.sum()), (3, 5_000, 5_010));
        assert_eq!(a.percentile(50), Some(7));
    }
}

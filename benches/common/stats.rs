//! Statistics over measured rounds, and the PRNG behind them and the uploads.

use std::time::Duration;

/// wyrand: a tiny, fast PRNG (about 1 ns per 8 bytes), so generating the payload
/// costs the bench client little next to sending it.
pub struct WyRand(pub u64);

impl WyRand {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let product = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((product >> 64) as u64) ^ (product as u64)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    pub fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// 2.5th and 97.5th percentiles of the median over 2000 resamples (fixed seed, so
/// the same rounds always give the same interval).
pub fn bootstrap_interval(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = WyRand(0x0ff1_0ad0);
    let mut medians: Vec<f64> = (0..2000)
        .map(|_| median((0..values.len()).map(|_| values[rng.below(values.len())]).collect()))
        .collect();
    medians.sort_by(f64::total_cmp);
    (medians[50], medians[1949])
}

pub fn megabytes_per_sec(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

pub fn micros(nanos: f64) -> String {
    format!("{:.1}", nanos / 1000.0)
}

/// Nearest-rank percentiles of durations in nanoseconds.
#[derive(Clone, Copy, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<u64>) -> Percentiles {
        samples.sort_unstable();
        let rank = |q: f64| {
            let index = ((q * samples.len() as f64).ceil() as usize).saturating_sub(1);
            samples.get(index).copied().unwrap_or(0) as f64
        };
        Percentiles {
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: samples.last().copied().unwrap_or(0) as f64,
        }
    }
}

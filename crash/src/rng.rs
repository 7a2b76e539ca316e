//! A small seeded random number generator (splitmix64): the run's choices — request sizes, pauses,
//! when to kill — all come from the seed printed at the start, so a failing run's choices can be
//! replayed with `--seed`. (The interleaving with the server is still up to the machine.)

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// An independent generator for one part of the run (a producer, the killer), derived from the seed.
    pub fn derive(seed: u64, stream: u64) -> Self {
        let mut base = Self(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        Self(base.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high]` (integers).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        debug_assert!(low <= high);
        low + self.next_u64() % (high - low + 1)
    }

    /// Uniform in `[low, high)`.
    pub fn between_f64(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// A seed from the clock, for runs without `--seed`.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    Rng::new(nanos as u64 ^ u64::from(std::process::id())).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_choices_and_derived_streams_differ() {
        let draws = |mut rng: Rng| (0..5).map(|_| rng.between(1, 100)).collect::<Vec<_>>();
        assert_eq!(draws(Rng::new(7)), draws(Rng::new(7)));
        assert_ne!(draws(Rng::derive(7, 1)), draws(Rng::derive(7, 2)));
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            let x = rng.between_f64(0.5, 2.0);
            assert!((0.5..2.0).contains(&x));
            assert!((10..=12).contains(&rng.between(10, 12)));
        }
    }
}

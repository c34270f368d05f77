//! Key choice as in YCSB: uniform, or zipfian (θ = 0.99) scrambled over the key space so the
//! hot keys are not clustered (YCSB's ScrambledZipfianGenerator).

use rand::RngExt;

/// YCSB's zipfian generator (Gray et al., "Quickly generating billion-record synthetic
/// databases"), over `0..n`.
#[derive(Debug, Clone)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipfian {
    pub fn new(n: u64, theta: f64) -> Zipfian {
        assert!(n >= 2, "a zipfian needs at least two items");
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        Zipfian {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }

    /// A rank in `0..n`; rank 0 is the most popular.
    pub fn next(&self, rng: &mut impl RngExt) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

#[derive(Debug, Clone)]
pub enum KeyChooser {
    Uniform(u64),
    Zipfian(Zipfian),
}

impl KeyChooser {
    pub fn new(dist: &str, n: u64) -> Result<KeyChooser, String> {
        match dist {
            "uniform" => Ok(KeyChooser::Uniform(n)),
            "zipfian" => Ok(KeyChooser::Zipfian(Zipfian::new(n.max(2), 0.99))),
            other => Err(format!(
                "unknown key distribution {other:?}: expected uniform or zipfian"
            )),
        }
    }

    /// A key index in `0..n`.
    pub fn next(&self, rng: &mut impl RngExt) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.random_range(0..*n),
            KeyChooser::Zipfian(z) => {
                // Scramble ranks over the key space (FNV-style hash, as YCSB does).
                let rank = z.next(rng);
                xxhash_rust::xxh3::xxh3_64(&rank.to_le_bytes()) % z.n
            }
        }
    }
}

/// The key for index `i`, YCSB style (`prefix` is "user" unless `--key-prefix` says otherwise).
pub fn key_name(prefix: &str, i: u64) -> String {
    format!("{prefix}{i:012}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn zipfian_is_skewed_and_in_range() {
        let z = Zipfian::new(1000, 0.99);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[z.next(&mut rng) as usize] += 1;
        }
        // Rank 0 gets about 1/H(1000, 0.99) ≈ 13% of draws; the tail is thin.
        assert!(counts[0] > 10_000 && counts[0] < 16_000, "{}", counts[0]);
        assert!(counts[0] > 5 * counts[10]);
        assert!(counts[999] < 100);
    }

    #[test]
    fn uniform_covers_the_space() {
        let k = KeyChooser::new("uniform", 10).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            seen[k.next(&mut rng) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert!(KeyChooser::new("pareto", 10).is_err());
    }
}

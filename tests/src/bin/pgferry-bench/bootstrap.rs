//! Percentile bootstrap over a benchmark's rounds: how far a figure made
//! from a handful of rounds on a noisy host may be from what many more
//! rounds would give. The rounds are drawn again with replacement, the
//! figure computed from each draw, and the interval read off the spread.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Draws per interval: enough for the 5th and 95th percentiles to settle
/// to the second decimal of a ratio.
const RESAMPLES: usize = 10_000;

/// The bounds `(lower, upper)` of a two-sided `confidence` interval (0.9:
/// from the 5th to the 95th percentile) of `figure`, a value computed from
/// a set of round indices, over `rounds` rounds drawn with replacement.
/// Seeded, so one run's JSON always yields the same interval.
pub(crate) fn interval(rounds: usize, confidence: f64, figure: impl Fn(&[usize]) -> f64) -> (f64, f64) {
    assert!(rounds > 0, "a bootstrap needs at least one round");
    let mut rng = StdRng::seed_from_u64(1);
    let mut draw = vec![0; rounds];
    let mut values: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            for d in draw.iter_mut() {
                *d = rng.random_range(0..rounds);
            }
            figure(&draw)
        })
        .collect();
    // A draw whose denominator came out zero gives an infinite or NaN
    // figure: it sorts last and widens the interval, as it should.
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((RESAMPLES - 1) as f64 * q).round() as usize];
    let tail = (1.0 - confidence) / 2.0;
    (at(tail), at(1.0 - tail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::median;

    #[test]
    fn a_figure_that_every_round_agrees_on_has_no_spread() {
        let per_round = [0.4; 7];
        let (lo, hi) = interval(per_round.len(), 0.9, |d| {
            median(&d.iter().map(|&i| per_round[i]).collect::<Vec<_>>())
        });
        assert_eq!((lo, hi), (0.4, 0.4));
    }

    #[test]
    fn the_interval_holds_the_figure_and_widens_with_the_spread() {
        let tight = [0.45, 0.47, 0.46, 0.48, 0.44, 0.46, 0.47, 0.45];
        let loose = [0.30, 0.62, 0.41, 0.55, 0.36, 0.58, 0.47, 0.44];
        let med = |v: &[f64]| {
            let v = v.to_vec();
            interval(v.len(), 0.9, move |d| {
                median(&d.iter().map(|&i| v[i]).collect::<Vec<_>>())
            })
        };
        let (tlo, thi) = med(&tight);
        let (llo, lhi) = med(&loose);
        assert!(tlo <= median(&tight) && median(&tight) <= thi, "{tlo} {thi}");
        assert!(llo <= median(&loose) && median(&loose) <= lhi, "{llo} {lhi}");
        assert!(
            lhi - llo > 2.0 * (thi - tlo),
            "tight {tlo}-{thi}, loose {llo}-{lhi}"
        );
        assert!(tlo >= 0.44 && thi <= 0.48, "within the data: {tlo}-{thi}");
    }
}

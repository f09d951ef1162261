//! The logit monitor: statistics against direct computation, the same figures from inside the
//! fused cross-entropy, and the story it exists for — an f16 run drifting toward overflow.

use lse::guard::{
    LogitMonitor, LogitStats, MonitorConfig, MonitorEvent, MonitorWarning, WarningKind,
};
use lse::{cross_entropy, f16, CrossEntropyOptions, DType, NonFinite, Reduction, Targets};
use lse_testkit::rng::Rng;

/// `n` values uniform in [-1, 1) from the stream `seed`.
fn uniform(seed: u64, n: usize) -> Vec<f64> {
    Rng::new(seed).fill_range(n, -1.0, 1.0)
}

/// logsumexp of a row in plain f64 (max-shifted; fine for these moderate rows).
fn reference_lse(row: &[f64]) -> f64 {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

#[test]
fn stats_match_a_direct_computation() {
    let classes = 7;
    let mut values: Vec<f64> = uniform(1, 5 * classes).iter().map(|v| v * 20.0).collect();
    values[3] = f64::NAN;
    values[9] = f64::INFINITY;
    values[10] = f64::NEG_INFINITY;
    let logits: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let stats = LogitStats::of(&logits, classes).unwrap();

    let widened: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
    let finite: Vec<f64> = widened.iter().copied().filter(|v| v.is_finite()).collect();
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!((stats.max, stats.min), (max, min));
    assert_eq!(stats.max_abs, max.abs().max(min.abs()));
    assert_eq!((stats.nan, stats.pos_inf, stats.neg_inf), (1, 1, 1));
    assert_eq!(
        (stats.rows, stats.classes, stats.dtype),
        (5, classes, DType::F32)
    );

    // Rows 0 and 1 hold NaN / +inf: their lse is left out; row 1 also holds the -inf.
    let clean: Vec<f64> = widened.chunks(classes).skip(2).map(reference_lse).collect();
    let mean = clean.iter().sum::<f64>() / 3.0;
    let z = clean.iter().map(|l| l * l).sum::<f64>() / 3.0;
    // Each row's lse is that of `lse::logsumexp` on f32 logits: within 2 ulp of f32 (docs/numerics.md), i.e. 2^-22 relative; the mean of three such values and the mean of their squares
    // stay within that and twice that.
    let tolerance = 2f64.powi(-22);
    assert!((stats.lse_mean - mean).abs() <= tolerance * mean.abs());
    assert!((stats.z_mean - z).abs() <= 2.0 * tolerance * z);
    let lse_max = clean.iter().copied().fold(f64::MIN, f64::max);
    assert!((stats.lse_max - lse_max).abs() <= tolerance * lse_max.abs());
    assert!((stats.headroom.f16 - (65504f64.ln() - max)).abs() < 1e-12);
    assert!((stats.headroom_against(DType::F32) - (f64::from(f32::MAX).ln() - max)).abs() < 1e-9);
    assert!(stats.has_non_finite());

    let json = stats.to_json_line();
    assert!(!json.contains('\n'));
    assert!(json.contains("\"dtype\":\"f32\"") && json.contains("\"nan\":1"));
}

#[test]
fn stats_from_the_fused_loss_equal_the_stand_alone_pass() {
    let classes = 33;
    let logits: Vec<f16> = uniform(2, 8 * classes)
        .iter()
        .map(|v| f16::from_f64(v * 14.0))
        .collect();
    let targets: Vec<i64> = (0..8).map(|r| (r * 5) % classes as i64).collect();
    let options = CrossEntropyOptions {
        keep_logit_stats: true,
        ..Default::default()
    };
    let out = cross_entropy(&logits, classes, Targets::Classes(&targets), &options).unwrap();
    assert_eq!(
        out.logit_stats,
        Some(LogitStats::of(&logits, classes).unwrap())
    );

    // Ignored rows are not read, so they are not in the statistics.
    let mut ignored = targets.clone();
    ignored[0] = -100;
    let out = cross_entropy(&logits, classes, Targets::Classes(&ignored), &options).unwrap();
    let rest = LogitStats::of(&logits[classes..], classes).unwrap();
    assert_eq!(out.logit_stats, Some(rest));
}

/// The story the monitor exists for: f16 logits grow a little every step (a learning rate a bit
/// too high). A naive f16 cross-entropy dies (inf/NaN) once the largest logit passes 11.09; the
/// monitor must have warned before that step, and `lse`'s fused loss stays finite throughout.
#[test]
fn monitor_warns_before_a_growing_f16_run_overflows_naive_softmax() {
    let (rows, classes) = (16, 50);
    let pattern = uniform(3, rows * classes);
    let targets: Vec<i64> = (0..rows as i64).map(|r| (r * 7) % classes as i64).collect();
    let mut monitor = LogitMonitor::new(MonitorConfig::default()).unwrap();
    let options = CrossEntropyOptions {
        keep_logit_stats: true,
        non_finite: NonFinite::Propagate,
        ..Default::default()
    };
    let mut first_warning = None;
    let mut naive_death = None;
    for step in 0..60u64 {
        let scale = 0.5 + 0.25 * step as f64;
        let logits: Vec<f16> = pattern.iter().map(|p| f16::from_f64(p * scale)).collect();

        let out = cross_entropy(&logits, classes, Targets::Classes(&targets), &options).unwrap();
        assert!(out.loss.is_finite(), "step {step}: fused loss {}", out.loss);

        let mut naive_loss = vec![f16::ZERO; rows];
        let mut naive_grad = vec![f16::ZERO; rows * classes];
        lse::naive::cross_entropy(&logits, classes, &targets, &mut naive_loss, &mut naive_grad)
            .unwrap();
        if naive_death.is_none() && naive_loss.iter().any(|l| !l.is_finite()) {
            naive_death = Some(step);
        }

        let events = monitor.record(step, out.logit_stats.unwrap());
        if first_warning.is_none() && !events.is_empty() {
            first_warning = events[0].warning().map(|w| (step, w.clone()));
        }
    }
    let death = naive_death.expect("the naive f16 loss must overflow in this run");
    let (warned, warning) = first_warning.expect("the monitor must warn");
    assert!(
        warned + 3 <= death,
        "warned at step {warned} ({warning}), naive loss died at step {death}"
    );
    assert!(matches!(
        warning,
        MonitorWarning::Trend { .. } | MonitorWarning::NearOverflow { .. }
    ));

    let mut lines = Vec::new();
    monitor.write_json_lines(&mut lines).unwrap();
    let text = String::from_utf8(lines).unwrap();
    assert_eq!(text.lines().count(), 60);
    assert!(text.lines().all(|l| l.starts_with("{\"step\":")));
}

#[test]
fn monitor_rejects_a_meaningless_config() {
    let bad = MonitorConfig {
        warn_fraction: f64::NAN,
        ..Default::default()
    };
    assert!(LogitMonitor::new(bad).is_err());
}

#[test]
fn reduction_and_stats_are_independent() {
    // Asking for statistics changes nothing else in the output.
    let logits = [3.0f64, -1.0, 0.5, 2.0, 2.0, -7.0];
    let targets = [2i64, 0];
    for reduction in [Reduction::None, Reduction::Sum, Reduction::Mean] {
        let plain = CrossEntropyOptions {
            reduction,
            ..Default::default()
        };
        let watched = CrossEntropyOptions {
            keep_logit_stats: true,
            ..plain
        };
        let a = cross_entropy(&logits, 3, Targets::Classes(&targets), &plain).unwrap();
        let b = cross_entropy(&logits, 3, Targets::Classes(&targets), &watched).unwrap();
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
        assert_eq!(a.row_loss, b.row_loss);
        assert!(a.logit_stats.is_none() && b.logit_stats.is_some());
    }
}

/// Statistics of a one-row batch whose largest `|x|` is `peak` (and a NaN when `nan`).
fn batch(peak: f32, nan: bool) -> LogitStats {
    let row = [peak, 0.5, if nan { f32::NAN } else { -1.0 }];
    LogitStats::of(&row, 3).unwrap()
}

/// Warnings come on transitions: a start, a reminder every K steps while the condition holds,
/// a clearing; nothing in between. The expected events are worked out here from the sequence
/// of peaks alone (near-overflow holds while the peak passes 0.75 · ln 65504 = 8.318).
#[test]
fn monitor_reports_starts_reminders_and_clearings_not_every_step() {
    let config = MonitorConfig {
        trend_window: 0,
        reminder_interval: 10,
        clear_after: 1,
        ..MonitorConfig::default()
    };
    let mut monitor = LogitMonitor::new(config).unwrap();
    // Steps 0..100: below the line, then above it over [20, 47), below, above over [60, 63);
    // NaN at steps 30 and 31.
    let peak = |step: u64| {
        if (20..47).contains(&step) || (60..63).contains(&step) {
            9.0
        } else {
            4.0
        }
    };
    let mut said = Vec::new();
    for step in 0..100u64 {
        let nan = step == 30 || step == 31;
        let events = monitor.record(step, batch(peak(step), nan)).to_vec();
        let entry = monitor.history().last().unwrap();
        // Every start and reminder carries exactly the warning of its step, as before.
        for event in &events {
            if let Some(warning) = event.warning() {
                assert!(entry.warnings.contains(warning), "{event}");
                assert_eq!(warning.step(), step);
            }
            said.push((event.step(), event.kind(), kind_of(event)));
        }
        // The condition itself is still recorded at every step it holds.
        assert_eq!(
            entry.warnings.len(),
            usize::from(peak(step) > 8.318) + usize::from(nan)
        );
    }
    use WarningKind::{NearOverflow, NonFinite};
    let expected = [
        (20, NearOverflow, "started"),
        (30, NonFinite, "started"),
        (30, NearOverflow, "reminder"),
        (32, NonFinite, "cleared"),
        (40, NearOverflow, "reminder"),
        (47, NearOverflow, "cleared"),
        (60, NearOverflow, "started"),
        (63, NearOverflow, "cleared"),
    ];
    assert_eq!(said, expected);

    let text: Vec<String> = monitor
        .history()
        .flat_map(|e| e.events.iter().map(ToString::to_string))
        .collect();
    assert!(text[0].starts_with("step 20: max |logit| = 9.0000 is 81% of the f16"));
    assert!(text[2].ends_with("(still, since step 20)"), "{}", text[2]);
    assert_eq!(
        text[3],
        "step 32: cleared: non-finite logits (held from step 30 to step 31); max |logit| = 9.0000"
    );
}

fn kind_of(event: &MonitorEvent) -> &'static str {
    match event {
        MonitorEvent::Started { .. } => "started",
        MonitorEvent::Reminder { .. } => "reminder",
        MonitorEvent::Cleared { .. } => "cleared",
    }
}

/// With reminders off, a condition that holds for a long run is reported once when it starts
/// and once when it clears.
#[test]
fn reminders_can_be_turned_off() {
    let config = MonitorConfig {
        reminder_interval: 0,
        ..MonitorConfig::default()
    };
    let mut monitor = LogitMonitor::new(config).unwrap();
    let mut count = 0;
    for step in 0..2000u64 {
        let peak = if step < 1990 { 10.0 } else { 1.0 };
        count += monitor.record(step, batch(peak, false)).len();
    }
    assert_eq!(count, 2);
    assert!(monitor.active().is_empty());
}

/// A value hovering around the threshold is one condition, not a start and a clearing at every
/// crossing: it clears only after `clear_after` steps without it.
#[test]
fn a_condition_clears_only_after_clear_after_steps_without_it() {
    let config = MonitorConfig {
        trend_window: 0,
        clear_after: 5,
        ..MonitorConfig::default()
    };
    let mut monitor = LogitMonitor::new(config).unwrap();
    // Above the line at even steps 10..30, below at the odd ones and from 30 on.
    let mut said = Vec::new();
    for step in 0..60u64 {
        let above = (10..30).contains(&step) && step % 2 == 0;
        for event in monitor.record(step, batch(if above { 9.0 } else { 4.0 }, false)) {
            said.push((event.step(), kind_of(event)));
        }
    }
    // The last step above is 28: cleared at 28 + 5.
    assert_eq!(said, [(10, "started"), (33, "cleared")]);
    let bad = MonitorConfig {
        clear_after: 0,
        ..MonitorConfig::default()
    };
    assert!(LogitMonitor::new(bad).is_err());
}

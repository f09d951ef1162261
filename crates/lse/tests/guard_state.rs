//! Checkpointing the guards: a run stopped at any step and resumed from its saved (JSON
//! round-tripped) state goes on exactly as the run that never stopped.

use lse::f16;
use lse::guard::{
    LogitMonitor, LogitStats, LossScaler, LossScalerConfig, MonitorConfig, MonitorState,
    ScalerState, StateError, STATE_VERSION,
};

const STEPS: u64 = 60;

fn scaler_config() -> LossScalerConfig {
    LossScalerConfig {
        init_scale: 1024.0,
        growth_interval: 4,
        hysteresis: 2,
        max_scale: 8192.0,
        ..LossScalerConfig::default()
    }
}

fn monitor_config() -> MonitorConfig {
    MonitorConfig {
        trend_window: 5,
        capacity: 40,
        ..MonitorConfig::default()
    }
}

/// The true gradient of step `step`: overflows in f16 at 2^10 and above on bursts of steps, so
/// the scaler backs off (after two in a row), grows, and hits its ceiling.
fn true_gradient(step: u64) -> Vec<f64> {
    let big = matches!(step % 17, 5..=7) || step == 40;
    vec![if big { 100.0 } else { 0.25 }, -0.5, 1.0, 0.125]
}

/// The logits of step `step`: the largest logit rises toward f16's overflow point, passes 75% of
/// it, falls back, rises again; step 23 holds a NaN.
fn logits(step: u64) -> Vec<f32> {
    let peak = 2.0 + 0.4 * (step % 30) as f32;
    let mut row = vec![peak, 0.5, -1.0, -peak / 2.0, 0.25, 1.5];
    if step == 23 {
        row[1] = f32::NAN;
    }
    row
}

/// What one step produced: the scale it used, whether it was skipped, and the monitor's words.
#[derive(Debug, PartialEq)]
struct Observed {
    scale: f64,
    skipped: bool,
    warnings: Vec<String>,
}

fn run_step(scaler: &mut LossScaler, monitor: &mut LogitMonitor, step: u64) -> Observed {
    let scale = scaler.scale();
    let mut grad: Vec<f16> = true_gradient(step)
        .iter()
        .map(|g| f16::from_f64(g * scale))
        .collect();
    let mut unscale = scaler.unscaler();
    unscale.apply("w", &mut grad, 2).unwrap();
    let report = unscale.finish();
    let stats = LogitStats::of(&logits(step), 6).unwrap();
    let warnings = monitor
        .record(step, stats)
        .iter()
        .map(ToString::to_string)
        .collect();
    Observed {
        scale: report.scale,
        skipped: report.skipped,
        warnings,
    }
}

/// Runs `steps` from fresh or resumed guards.
fn run(
    scaler: &mut LossScaler,
    monitor: &mut LogitMonitor,
    steps: std::ops::Range<u64>,
) -> Vec<Observed> {
    steps.map(|s| run_step(scaler, monitor, s)).collect()
}

fn fresh() -> (LossScaler, LogitMonitor) {
    (
        LossScaler::new(scaler_config()).unwrap(),
        LogitMonitor::new(monitor_config()).unwrap(),
    )
}

/// The guards' states through JSON text, as a checkpoint file holds them.
fn checkpoint(scaler: &LossScaler, monitor: &LogitMonitor) -> (String, String) {
    (
        serde_json::to_string(&scaler.state()).unwrap(),
        serde_json::to_string(&monitor.state()).unwrap(),
    )
}

fn restore(saved: &(String, String)) -> (LossScaler, LogitMonitor) {
    let scaler_state: ScalerState = serde_json::from_str(&saved.0).unwrap();
    let monitor_state: MonitorState = serde_json::from_str(&saved.1).unwrap();
    (
        LossScaler::from_state(scaler_config(), &scaler_state).unwrap(),
        LogitMonitor::from_state(monitor_config(), &monitor_state).unwrap(),
    )
}

#[test]
fn a_run_resumed_from_json_at_any_step_matches_the_uninterrupted_run() {
    let (mut scaler, mut monitor) = fresh();
    let whole = run(&mut scaler, &mut monitor, 0..STEPS);
    let end = checkpoint(&scaler, &monitor);

    // The scenario exercises what a resume must carry over: backoffs, growth, a clamp at the
    // ceiling, skipped steps, warnings of every kind, a history longer than the capacity.
    let scales: Vec<f64> = whole.iter().map(|o| o.scale).collect();
    assert!(
        scales.contains(&8192.0) && scales.contains(&512.0),
        "{scales:?}"
    );
    assert!(whole.iter().filter(|o| o.skipped).count() >= 6);
    let said = whole.iter().flat_map(|o| o.warnings.iter()).count();
    assert!(whole[23].warnings.iter().any(|w| w.contains("NaN")));
    assert!(said > 10, "{said} warnings");

    for stop in 1..STEPS {
        let (mut scaler, mut monitor) = fresh();
        let mut resumed = run(&mut scaler, &mut monitor, 0..stop);
        let saved = checkpoint(&scaler, &monitor);
        drop((scaler, monitor));
        let (mut scaler, mut monitor) = restore(&saved);
        resumed.extend(run(&mut scaler, &mut monitor, stop..STEPS));
        assert_eq!(resumed, whole, "resumed at step {stop}");
        assert_eq!(
            checkpoint(&scaler, &monitor),
            end,
            "state after resuming at {stop}"
        );
    }
}

#[test]
fn resuming_without_the_state_would_not_match() {
    // The checkpoint carries information: guards started afresh at step 30 (scale back at
    // init_scale, no history) diverge from the uninterrupted run.
    let (mut scaler, mut monitor) = fresh();
    let whole = run(&mut scaler, &mut monitor, 0..STEPS);
    let (mut scaler, mut monitor) = fresh();
    let restarted = run(&mut scaler, &mut monitor, 30..STEPS);
    assert_ne!(restarted, whole[30..]);
}

#[test]
fn the_json_format_is_versioned_and_readable() {
    let (mut scaler, mut monitor) = fresh();
    run(&mut scaler, &mut monitor, 0..9);
    let json: serde_json::Value = serde_json::to_value(scaler.state()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "version": 1, "scale": scaler.scale(), "step": 9,
            "clean_steps": scaler.clean_steps(), "overflow_streak": scaler.overflow_streak()
        })
    );
    let json = serde_json::to_value(monitor.state()).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["history"].as_array().unwrap().len(), 9);
    assert_eq!(json["history"][8]["step"], 8);
}

#[test]
fn states_that_cannot_be_restored_are_typed_errors() {
    let (scaler, monitor) = fresh();
    let mut state = scaler.state();
    state.version = STATE_VERSION + 1;
    assert_eq!(
        LossScaler::from_state(scaler_config(), &state),
        Err(StateError::UnsupportedVersion {
            found: STATE_VERSION + 1,
            supported: STATE_VERSION
        })
    );
    let mut monitor_state = monitor.state();
    monitor_state.version = 0;
    assert!(matches!(
        LogitMonitor::from_state(monitor_config(), &monitor_state),
        Err(StateError::UnsupportedVersion { found: 0, .. })
    ));

    for bad in [16384.0, 0.5, f64::NAN, f64::INFINITY, 0.0] {
        let state = ScalerState {
            scale: bad,
            ..scaler.state()
        };
        let err = LossScaler::from_state(scaler_config(), &state).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::ScaleOutOfBounds {
                    min: 1.0,
                    max: 8192.0,
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
    let bad_config = LossScalerConfig {
        hysteresis: 0,
        ..scaler_config()
    };
    assert!(matches!(
        LossScaler::from_state(bad_config, &scaler.state()),
        Err(StateError::ScalerConfig(_))
    ));
    let bad_config = MonitorConfig {
        capacity: 0,
        ..monitor_config()
    };
    assert!(matches!(
        LogitMonitor::from_state(bad_config, &monitor.state()),
        Err(StateError::MonitorConfig(_))
    ));
}

#[test]
fn a_smaller_capacity_keeps_the_newest_history() {
    let (mut scaler, mut monitor) = fresh();
    run(&mut scaler, &mut monitor, 0..12);
    let small = MonitorConfig {
        capacity: 5,
        ..monitor_config()
    };
    let resumed = LogitMonitor::from_state(small, &monitor.state()).unwrap();
    let steps: Vec<u64> = resumed.history().map(|e| e.step).collect();
    assert_eq!(steps, [7, 8, 9, 10, 11]);
}

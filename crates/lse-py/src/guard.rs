//! The training guards of `lse::guard` for Python: logit statistics and their monitor, the
//! finiteness guard, the NaN triage and the dynamic loss scaler.
//!
//! Reports cross into Python as the JSON the core library writes (`lse.guard` decodes it into
//! dicts, non-finite values included), so the two stay one format.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use lse::guard::{
    self, FiniteGuard as CoreGuard, GuardError, LogitMonitor as CoreMonitor,
    LossScaler as CoreScaler, LossScalerConfig, MonitorConfig, MonitorState, Role, ScalerState,
    Schedule, TensorShapeError, TensorView,
};
use lse::{bf16, f16, DType};

use crate::{borrowed, lse_error, raise, unsupported};

/// Declares `$name`: a 1-D NumPy array of one of lse's four dtypes, borrowed with `$borrow`
/// (read-only or writable) for as long as the value lives.
macro_rules! borrowed_array {
    ($(#[$doc:meta])* $name:ident, $wrapper:ident, $borrow:ident) => {
        $(#[$doc])*
        enum $name<'py> {
            F64($wrapper<'py, f64>),
            F32($wrapper<'py, f32>),
            F16($wrapper<'py, f16>),
            Bf16($wrapper<'py, bf16>),
        }

        impl<'py> $name<'py> {
            fn borrow(array: &Bound<'py, PyAny>) -> PyResult<Self> {
                if let Ok(a) = array.cast::<PyArray1<f64>>() {
                    Ok(Self::F64(a.$borrow().map_err(borrowed)?))
                } else if let Ok(a) = array.cast::<PyArray1<f32>>() {
                    Ok(Self::F32(a.$borrow().map_err(borrowed)?))
                } else if let Ok(a) = array.cast::<PyArray1<f16>>() {
                    Ok(Self::F16(a.$borrow().map_err(borrowed)?))
                } else if let Ok(a) = array.cast::<PyArray1<bf16>>() {
                    Ok(Self::Bf16(a.$borrow().map_err(borrowed)?))
                } else {
                    Err(unsupported(array))
                }
            }
        }
    };
}

borrowed_array!(
    /// An array read by a guard (checked, triaged, summarised).
    Held,
    PyReadonlyArray1,
    try_readonly
);
borrowed_array!(
    /// A gradient the loss scaler unscales in place.
    HeldMut,
    PyReadwriteArray1,
    try_readwrite
);

impl<'py> Held<'py> {
    /// A named view of the array as `rows × columns`.
    fn view<'a>(&'a self, name: &'a str, role: Role, columns: usize) -> PyResult<TensorView<'a>> {
        let view = match self {
            Held::F64(a) => TensorView::new(name, role, a.as_slice()?, columns),
            Held::F32(a) => TensorView::new(name, role, a.as_slice()?, columns),
            Held::F16(a) => TensorView::new(name, role, a.as_slice()?, columns),
            Held::Bf16(a) => TensorView::new(name, role, a.as_slice()?, columns),
        };
        view.map_err(shape_error)
    }

    /// [`lse::guard::LogitStats::of`] of the array as `rows × columns`.
    fn stats(&self, columns: usize) -> lse::Result<guard::LogitStats> {
        match self {
            Held::F64(a) => guard::LogitStats::of(a.as_slice().unwrap_or_default(), columns),
            Held::F32(a) => guard::LogitStats::of(a.as_slice().unwrap_or_default(), columns),
            Held::F16(a) => guard::LogitStats::of(a.as_slice().unwrap_or_default(), columns),
            Held::Bf16(a) => guard::LogitStats::of(a.as_slice().unwrap_or_default(), columns),
        }
    }
}

fn shape_error(e: TensorShapeError) -> PyErr {
    Python::attach(|py| raise(py, "ShapeError", e.to_string(), &[]))
}

fn role(name: &str) -> PyResult<Role> {
    Ok(match name {
        "input" => Role::Input,
        "logits" => Role::Logits,
        "probabilities" => Role::Probabilities,
        "loss" => Role::Loss,
        "gradient" => Role::Gradient,
        "other" => Role::Other,
        other => {
            return Err(PyValueError::new_err(format!(
                "role must be one of input, logits, probabilities, loss, gradient, other; not {other:?}"
            )))
        }
    })
}

fn dtype(name: &str) -> PyResult<DType> {
    name.parse::<DType>()
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

fn json<T: serde::Serialize>(value: &T) -> PyResult<String> {
    serde_json::to_string(value).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Statistics of one batch of logits (`lse::guard::LogitStats`): from the fused cross-entropy's
/// read pass (`keep_logit_stats=True`) or computed from an array.
#[pyclass(module = "lse._lse", frozen)]
#[derive(Clone)]
pub(crate) struct LogitStats(guard::LogitStats);

impl From<guard::LogitStats> for LogitStats {
    fn from(stats: guard::LogitStats) -> Self {
        LogitStats(stats)
    }
}

#[pymethods]
impl LogitStats {
    /// The statistics of `logits` (flat, `classes` per row).
    #[staticmethod]
    fn of(py: Python<'_>, logits: &Bound<'_, PyAny>, classes: usize) -> PyResult<Self> {
        let held = Held::borrow(logits)?;
        held.stats(classes)
            .map(LogitStats)
            .map_err(|e| lse_error(py, e))
    }

    /// The fields as JSON (non-finite numbers as the strings "NaN", "inf", "-inf").
    fn to_json(&self) -> PyResult<String> {
        let s = &self.0;
        // serde_json writes non-finite f64 as null; name them instead, as the guard's reports do.
        let num = |v: f64| -> serde_json::Value {
            if v.is_finite() {
                serde_json::json!(v)
            } else {
                serde_json::json!(if v.is_nan() {
                    "NaN"
                } else if v > 0.0 {
                    "inf"
                } else {
                    "-inf"
                })
            }
        };
        let value = serde_json::json!({
            "dtype": s.dtype.name(), "rows": s.rows, "classes": s.classes,
            "max": num(s.max), "min": num(s.min), "max_abs": num(s.max_abs),
            "nan": s.nan, "pos_inf": s.pos_inf, "neg_inf": s.neg_inf,
            "lse_mean": num(s.lse_mean), "lse_max": num(s.lse_max), "z_mean": num(s.z_mean),
            "headroom": {"f16": num(s.headroom.f16), "bf16": num(s.headroom.bf16),
                         "f32": num(s.headroom.f32)},
        });
        json(&value)
    }
}

/// `lse::guard::LogitMonitor`: a history of per-batch logit statistics that warns while the
/// logits drift toward the watched dtype's naive-exp overflow point.
#[pyclass(module = "lse._lse")]
pub(crate) struct LogitMonitor(CoreMonitor);

#[pymethods]
impl LogitMonitor {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (
        *, watch, warn_fraction, trend_window, trend_horizon, capacity, reminder_interval,
        clear_after
    ))]
    fn new(
        py: Python<'_>,
        watch: &str,
        warn_fraction: f64,
        trend_window: usize,
        trend_horizon: f64,
        capacity: usize,
        reminder_interval: u64,
        clear_after: u64,
    ) -> PyResult<Self> {
        let config = MonitorConfig {
            watch: dtype(watch)?,
            warn_fraction,
            trend_window,
            trend_horizon,
            capacity,
            reminder_interval,
            clear_after,
        };
        CoreMonitor::new(config)
            .map(LogitMonitor)
            .map_err(|e| lse_error(py, e))
    }

    /// `MonitorConfig::default()` as JSON (the Python layer's defaults).
    #[staticmethod]
    fn default_config_json() -> PyResult<String> {
        json(&MonitorConfig::default())
    }

    /// `LogitMonitor::state` as JSON.
    fn state_json(&self) -> PyResult<String> {
        json(&self.0.state())
    }

    /// Restores a state written by `state_json` (with this monitor's configuration).
    fn load_state_json(&mut self, py: Python<'_>, state: &str) -> PyResult<()> {
        let state: MonitorState = serde_json::from_str(state)
            .map_err(|e| raise(py, "StateError", format!("invalid monitor state: {e}"), &[]))?;
        self.0 = CoreMonitor::from_state(self.0.config().clone(), &state)
            .map_err(|e| raise(py, "StateError", e.to_string(), &[]))?;
        Ok(())
    }

    /// Records one step; returns its monitor events (a warning started, a reminder, a warning
    /// cleared) as (text, JSON) pairs.
    fn record(&mut self, step: u64, stats: &LogitStats) -> PyResult<Vec<(String, String)>> {
        self.0
            .record(step, stats.0.clone())
            .iter()
            .map(|w| Ok((w.to_string(), json(w)?)))
            .collect()
    }

    /// The history as JSON lines, oldest step first.
    fn json_lines(&self) -> PyResult<String> {
        let mut out = Vec::new();
        self.0
            .write_json_lines(&mut out)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        String::from_utf8(out).map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

/// `lse::guard::FiniteGuard`: fail-fast NaN/inf checks of named tensors on a schedule.
#[pyclass(module = "lse._lse")]
pub(crate) struct FiniteGuard(CoreGuard);

fn guard_error(py: Python<'_>, error: GuardError) -> PyErr {
    let message = error.to_string();
    match error {
        GuardError::NonFinite {
            tensor,
            role,
            dtype,
            batch,
            row,
            column,
            value,
        } => {
            let attrs = (|| -> PyResult<Vec<(&str, Py<PyAny>)>> {
                let obj = |o: Bound<'_, PyAny>| o.unbind();
                Ok(vec![
                    ("tensor", obj(tensor.into_pyobject(py)?.into_any())),
                    ("role", obj(role.name().into_pyobject(py)?.into_any())),
                    ("dtype", obj(dtype.name().into_pyobject(py)?.into_any())),
                    ("batch", obj(batch.into_pyobject(py)?.into_any())),
                    ("row", obj(row.into_pyobject(py)?.into_any())),
                    ("column", obj(column.into_pyobject(py)?.into_any())),
                    ("value", obj(value.into_pyobject(py)?.into_any())),
                ])
            })();
            match attrs {
                Ok(attrs) => raise(py, "GuardError", message, &attrs),
                Err(e) => e,
            }
        }
        GuardError::Shape(e) => shape_error(e),
        _ => raise(py, "GuardError", message, &[]),
    }
}

#[pymethods]
impl FiniteGuard {
    /// `first`/`every` as in `Schedule::FirstThenEvery`; `schedule` "always" or "never" instead.
    #[new]
    #[pyo3(signature = (*, schedule, first, every))]
    fn new(schedule: &str, first: u64, every: u64) -> PyResult<Self> {
        let schedule = match schedule {
            "always" => Schedule::Always,
            "never" => Schedule::Never,
            "first_then_every" => Schedule::FirstThenEvery { first, every },
            other => {
                return Err(PyValueError::new_err(format!(
                    "schedule must be 'always', 'never' or 'first_then_every', not {other:?}"
                )))
            }
        };
        Ok(FiniteGuard(CoreGuard::new(schedule)))
    }

    fn begin_batch(&mut self, batch: u64) {
        self.0.begin_batch(batch);
    }

    #[getter]
    fn batch(&self) -> u64 {
        self.0.batch()
    }

    #[getter]
    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    #[getter]
    fn tensors_checked(&self) -> u64 {
        self.0.tensors_checked()
    }

    /// Checks `data` (flat, `columns` per row) named `name` with role `role`.
    fn check(
        &mut self,
        py: Python<'_>,
        name: &str,
        role_name: &str,
        data: &Bound<'_, PyAny>,
        columns: usize,
    ) -> PyResult<()> {
        if !self.0.is_active() {
            return Ok(());
        }
        let held = Held::borrow(data)?;
        let view = held.view(name, role(role_name)?, columns)?;
        let guard = &mut self.0;
        py.detach(|| guard.check(&view))
            .map_err(|e| guard_error(py, e))
    }

    /// Checks a scalar loss.
    fn check_loss(&mut self, py: Python<'_>, name: &str, value: f64) -> PyResult<()> {
        self.0
            .check_loss(name, value)
            .map_err(|e| guard_error(py, e))
    }
}

/// `lse::guard::triage` of one step's tensors, given in forward/backward order as
/// `(name, role, flat array, columns)`; returns the report as JSON and as its text.
#[pyfunction]
pub(crate) fn triage(
    py: Python<'_>,
    tensors: Vec<(String, String, Bound<'_, PyAny>, usize)>,
) -> PyResult<(String, String)> {
    let held = tensors
        .iter()
        .map(|(_, _, data, _)| Held::borrow(data))
        .collect::<PyResult<Vec<_>>>()?;
    let views = tensors
        .iter()
        .zip(&held)
        .map(|((name, role_name, _, columns), h)| h.view(name, role(role_name)?, *columns))
        .collect::<PyResult<Vec<_>>>()?;
    let report = py.detach(|| guard::triage(&views));
    Ok((report.to_json(), report.to_string()))
}

/// `lse::guard::LossScaler`: dynamic loss scaling with `torch.amp.GradScaler`'s rules.
#[pyclass(module = "lse._lse")]
pub(crate) struct LossScaler(CoreScaler);

/// A gradient's elements, borrowed for unscaling.
enum GradSlice<'a> {
    F64(&'a mut [f64]),
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [bf16]),
}

#[pymethods]
impl LossScaler {
    #[new]
    #[pyo3(signature = (*, init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale))]
    #[allow(clippy::too_many_arguments)] // one keyword per LossScalerConfig field
    fn new(
        py: Python<'_>,
        init_scale: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u32,
        hysteresis: u32,
        min_scale: f64,
        max_scale: f64,
    ) -> PyResult<Self> {
        let config = LossScalerConfig {
            init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            hysteresis,
            min_scale,
            max_scale,
        };
        CoreScaler::new(config)
            .map(LossScaler)
            .map_err(|e| raise(py, "OptionError", e.to_string(), &[]))
    }

    #[getter]
    fn scale(&self) -> f64 {
        self.0.scale()
    }

    #[getter]
    fn step_index(&self) -> u64 {
        self.0.step_index()
    }

    #[getter]
    fn clean_steps(&self) -> u32 {
        self.0.clean_steps()
    }

    #[getter]
    fn overflow_streak(&self) -> u32 {
        self.0.overflow_streak()
    }

    /// `LossScalerConfig::default()` as JSON (the Python layer's defaults).
    #[staticmethod]
    fn default_config_json() -> PyResult<String> {
        json(&LossScalerConfig::default())
    }

    /// The configuration as JSON.
    fn config_json(&self) -> PyResult<String> {
        json(self.0.config())
    }

    /// `LossScaler::state` as JSON.
    fn state_json(&self) -> PyResult<String> {
        json(&self.0.state())
    }

    /// Restores a state written by `state_json` (with this scaler's configuration).
    fn load_state_json(&mut self, py: Python<'_>, state: &str) -> PyResult<()> {
        let state: ScalerState = serde_json::from_str(state).map_err(|e| {
            raise(
                py,
                "StateError",
                format!("invalid loss scaler state: {e}"),
                &[],
            )
        })?;
        self.0 = CoreScaler::from_state(self.0.config().clone(), &state)
            .map_err(|e| raise(py, "StateError", e.to_string(), &[]))?;
        Ok(())
    }

    /// Unscales each `(name, flat array, columns)` gradient in place and checks it in the same
    /// pass, then updates the scale; returns the step report as JSON and as its text.
    fn unscale(
        &mut self,
        py: Python<'_>,
        grads: Vec<(String, Bound<'_, PyAny>, usize)>,
    ) -> PyResult<(String, String)> {
        let mut held = grads
            .iter()
            .map(|(_, g, _)| HeldMut::borrow(g))
            .collect::<PyResult<Vec<_>>>()?;
        let mut slices = Vec::with_capacity(held.len());
        for h in held.iter_mut() {
            slices.push(match h {
                HeldMut::F64(a) => GradSlice::F64(a.as_slice_mut()?),
                HeldMut::F32(a) => GradSlice::F32(a.as_slice_mut()?),
                HeldMut::F16(a) => GradSlice::F16(a.as_slice_mut()?),
                HeldMut::Bf16(a) => GradSlice::Bf16(a.as_slice_mut()?),
            });
        }
        let names: Vec<(&str, usize)> = grads.iter().map(|(n, _, c)| (n.as_str(), *c)).collect();
        let scaler = &mut self.0;
        let report = py.detach(|| {
            let mut unscaler = scaler.unscaler();
            for ((name, columns), slice) in names.into_iter().zip(slices) {
                match slice {
                    GradSlice::F64(g) => unscaler.apply(name, g, columns),
                    GradSlice::F32(g) => unscaler.apply(name, g, columns),
                    GradSlice::F16(g) => unscaler.apply(name, g, columns),
                    GradSlice::Bf16(g) => unscaler.apply(name, g, columns),
                }?;
            }
            Ok(unscaler.finish())
        });
        let report = report.map_err(shape_error)?;
        Ok((json(&report)?, report.to_string()))
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LogitStats>()?;
    m.add_class::<LogitMonitor>()?;
    m.add_class::<FiniteGuard>()?;
    m.add_class::<LossScaler>()?;
    m.add_function(wrap_pyfunction!(triage, m)?)?;
    Ok(())
}

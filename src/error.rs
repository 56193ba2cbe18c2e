//! The crate-wide configuration error.

use std::borrow::Cow;
use std::fmt;

/// A setting that cannot work, rejected when a component is built.
///
/// Every `build()`, `start()` or `connect()` in the crate that can reject a
/// setting returns this error (or wraps it in its module's error): a zero
/// capacity, a zero concurrency, a minimum above its maximum, a ratio out of
/// range, a URL that does not parse. Nothing is raised to a working value
/// silently and nothing panics later inside a task.
///
/// # Examples
///
/// ```
/// use smolkit::ConfigError;
///
/// let err: ConfigError = smolkit::limit::Quota::per_second(0).unwrap_err();
/// assert_eq!(err.setting, "rate");
/// assert_eq!(err.value, "0");
/// assert_eq!(err.to_string(), "invalid rate = 0: must be greater than zero");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The setting, as its builder method names it without `with_`
    /// (`"capacity"`, `"autoscale min"`, `"base_url"`).
    pub setting: &'static str,
    /// The offending value, formatted.
    pub value: String,
    /// What the value must be instead.
    pub reason: Cow<'static, str>,
}

impl ConfigError {
    /// A setting `setting` whose `value` is refused for `reason`.
    pub fn new(
        setting: &'static str,
        value: impl fmt::Debug,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        let mut value = format!("{value:?}");
        // Strings read better without their quotes.
        if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
            value = value[1..value.len() - 1].to_owned();
        }
        ConfigError {
            setting,
            value,
            reason: reason.into(),
        }
    }

    /// `setting` was zero where it must be positive.
    pub fn zero(setting: &'static str) -> Self {
        ConfigError::new(setting, 0, "must be greater than zero")
    }

    /// A minimum above its maximum; `setting` names the pair.
    pub fn min_above_max(
        setting: &'static str,
        min: impl fmt::Debug,
        max: impl fmt::Debug,
    ) -> Self {
        ConfigError::new(
            setting,
            format_args!("{min:?}..={max:?}"),
            "the minimum must not be above the maximum",
        )
    }

    /// Rejects a zero `value` of `setting`.
    pub(crate) fn nonzero<N: Copy + PartialEq + Default + fmt::Debug>(
        setting: &'static str,
        value: N,
    ) -> Result<N, Self> {
        if value == N::default() {
            Err(ConfigError::zero(setting))
        } else {
            Ok(value)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} = {}: {}",
            self.setting, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_the_setting_and_value() {
        let e = ConfigError::new("window", Duration::from_millis(5), "must be at least 1 s");
        assert_eq!(e.to_string(), "invalid window = 5ms: must be at least 1 s");
        let e = ConfigError::new("base_url", "ftp://x", "must be http or https");
        assert_eq!(e.value, "ftp://x");
        let e = ConfigError::min_above_max("autoscale", 3, 1);
        assert_eq!(
            e.to_string(),
            "invalid autoscale = 3..=1: the minimum must not be above the maximum"
        );
        assert_eq!(
            ConfigError::nonzero("capacity", 0usize),
            Err(ConfigError::zero("capacity"))
        );
        assert_eq!(ConfigError::nonzero("capacity", 4usize), Ok(4));
    }
}

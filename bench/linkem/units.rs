//! Parsing of the human units the command line accepts: rates (`1gbit`), durations (`0.1ms`),
//! sizes (`2MiB`) and probabilities (`0.5%`). Units follow `tc`: `kbit` is 1000 bit/s.

use std::fmt;

/// Why a command-line quantity could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitError {
    what: &'static str,
    input: String,
    hint: &'static str,
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?}: expected {}",
            self.what, self.input, self.hint
        )
    }
}

impl std::error::Error for UnitError {}

/// Splits "12.5mbit" into (12.5, "mbit"); rejects negative, NaN and infinite numbers.
fn split_number(s: &str) -> Option<(f64, String)> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let value: f64 = num.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    Some((value, unit.trim().to_ascii_lowercase()))
}

/// A link rate in bits per second; `None` means unlimited.
pub fn parse_rate(s: &str) -> Result<Option<u64>, UnitError> {
    let err = || UnitError {
        what: "rate",
        input: s.to_string(),
        hint: "a number with bit, kbit, mbit or gbit (e.g. 1gbit, 250mbit), or \"unlimited\"",
    };
    if s.trim().eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let (value, unit) = split_number(s).ok_or_else(err)?;
    let scale = match unit.as_str() {
        "" | "bit" | "bps" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(err()),
    };
    let bps = value * scale;
    // Below 8 bit/s a single byte takes over a second; above 1 Tbit/s the user meant unlimited.
    if !(8.0..=1e12).contains(&bps) {
        return Err(err());
    }
    Ok(Some(bps.round() as u64))
}

/// A duration in nanoseconds.
pub fn parse_duration_ns(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError {
        what: "duration",
        input: s.to_string(),
        hint: "a number with ns, us, ms or s (e.g. 20ms, 0.1ms)",
    };
    let (value, unit) = split_number(s).ok_or_else(err)?;
    let scale = match unit.as_str() {
        "ns" => 1.0,
        "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        // A bare 0 is unambiguous.
        "" if value == 0.0 => 0.0,
        _ => return Err(err()),
    };
    let ns = value * scale;
    // An hour of one-way delay is far beyond any link and would only exhaust memory.
    if ns > 3600e9 {
        return Err(err());
    }
    Ok(ns.round() as u64)
}

/// A size in bytes (`b`, `kb`/`mb`/`gb` are powers of 1000, `kib`/`mib`/`gib` of 1024).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let err = || UnitError {
        what: "size",
        input: s.to_string(),
        hint: "a number of bytes with an optional b, kb, kib, mb, mib, gb or gib (e.g. 2MiB)",
    };
    let (value, unit) = split_number(s).ok_or_else(err)?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "kib" => 1024.0,
        "mb" | "m" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "gb" | "g" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let bytes = value * scale;
    // More than 16 GiB of queue is a typo, and we allocate it.
    if bytes > 16.0 * 1024.0 * 1024.0 * 1024.0 {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

/// A probability: `0.5%` or a plain fraction `0.005`.
pub fn parse_probability(s: &str) -> Result<f64, UnitError> {
    let err = || UnitError {
        what: "probability",
        input: s.to_string(),
        hint: "a percentage like 0.5% or a fraction between 0 and 1",
    };
    let (value, unit) = split_number(s).ok_or_else(err)?;
    let p = match unit.as_str() {
        "%" => value / 100.0,
        "" => value,
        _ => return Err(err()),
    };
    if !(0.0..=1.0).contains(&p) {
        return Err(err());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1gbit"), Ok(Some(1_000_000_000)));
        assert_eq!(parse_rate("100mbit"), Ok(Some(100_000_000)));
        assert_eq!(parse_rate("1.5Mbit"), Ok(Some(1_500_000)));
        assert_eq!(parse_rate("640kbit"), Ok(Some(640_000)));
        assert_eq!(parse_rate("9600"), Ok(Some(9600)));
        assert_eq!(parse_rate("unlimited"), Ok(None));
        assert!(parse_rate("1gbps").is_err());
        assert!(parse_rate("-1gbit").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("gbit").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("1ms"), Ok(1_000_000));
        assert_eq!(parse_duration_ns("0.1ms"), Ok(100_000));
        assert_eq!(parse_duration_ns("250us"), Ok(250_000));
        assert_eq!(parse_duration_ns("2s"), Ok(2_000_000_000));
        assert_eq!(parse_duration_ns("0"), Ok(0));
        assert!(parse_duration_ns("5").is_err());
        assert!(parse_duration_ns("5min").is_err());
        assert!(parse_duration_ns("1e3ms").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2MiB"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_size("1mb"), Ok(1_000_000));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1500"), Ok(1500));
        assert!(parse_size("1tb").is_err());
        assert!(parse_size("100GiB").is_err());
    }

    #[test]
    fn probabilities() {
        assert_eq!(parse_probability("0.5%"), Ok(0.005));
        assert_eq!(parse_probability("5%"), Ok(0.05));
        assert_eq!(parse_probability("0.01"), Ok(0.01));
        assert!(parse_probability("150%").is_err());
        assert!(parse_probability("2").is_err());
    }
}

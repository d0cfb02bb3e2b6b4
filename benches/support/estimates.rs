//! Criterion's estimates of this run, read back from where criterion wrote them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use serde_json::Value;

/// Where criterion writes its estimates, found the way criterion finds it.
pub(crate) fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    let metadata = std::env::var_os("CARGO").and_then(|cargo| {
        let out = Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .ok()?;
        let value: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(PathBuf::from(value.get("target_directory")?.as_str()?))
    });
    metadata
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("criterion")
}

/// Criterion's typical time (ns) for one function of a group, if this run measured it.
pub(crate) fn estimate(dir: &Path, group: &str, function: &str, since: SystemTime) -> Option<f64> {
    let path = dir.join(group).join(function).join("new/estimates.json");
    let fresh = std::fs::metadata(&path).ok()?.modified().ok()? >= since;
    let value: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    let typical = value
        .get("slope")
        .filter(|v| !v.is_null())
        .or(value.get("mean"))?;
    typical.get("point_estimate")?.as_f64().filter(|_| fresh)
}

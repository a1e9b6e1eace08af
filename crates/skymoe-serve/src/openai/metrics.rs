//! `/metrics`: the engine's counters and the server's HTTP counters in the Prometheus text
//! exposition format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::engine::EngineStats;

/// HTTP responses by route and status, counted by the server.
#[derive(Debug, Default)]
pub struct HttpCounters {
    by_route: Mutex<BTreeMap<(String, u16), u64>>,
}

impl HttpCounters {
    /// Count one response to `route` (a route pattern, not the raw path) with `status`.
    pub fn record(&self, route: &str, status: u16) {
        // A poisoned lock only means another thread panicked while counting: keep counting.
        let mut map = self.by_route.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((route.to_string(), status)).or_insert(0) += 1;
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> BTreeMap<(String, u16), u64> {
        self.by_route
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{{{labels}}} {value}");
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Render the metrics page.
pub fn render(model: &str, stats: &EngineStats, http: &BTreeMap<(String, u16), u64>) -> String {
    let mut out = String::with_capacity(4096);
    let m = format!("model_name=\"{}\"", escape_label(model));
    let kv_ratio = if stats.kv_blocks_total > 0 {
        stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64
    } else {
        0.0
    };
    let rows: [(&str, &str, &str, String); 12] = [
        (
            "skymoe_requests_total",
            "counter",
            "Generation requests accepted by the engine.",
            stats.requests_total.to_string(),
        ),
        (
            "skymoe_requests_finished_total",
            "counter",
            "Generation requests finished for any reason.",
            stats.requests_finished.to_string(),
        ),
        (
            "skymoe_requests_cancelled_total",
            "counter",
            "Generation requests cancelled because their client went away.",
            stats.requests_cancelled.to_string(),
        ),
        (
            "skymoe_requests_running",
            "gauge",
            "Requests in the running batch.",
            stats.running.to_string(),
        ),
        (
            "skymoe_requests_waiting",
            "gauge",
            "Requests waiting for a place in the batch (queue length).",
            stats.waiting.to_string(),
        ),
        (
            "skymoe_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            stats.prompt_tokens_total.to_string(),
        ),
        (
            "skymoe_generation_tokens_total",
            "counter",
            "Tokens generated.",
            stats.generated_tokens_total.to_string(),
        ),
        (
            "skymoe_generation_tokens_per_second",
            "gauge",
            "Generated tokens per second over the last few seconds.",
            format!("{}", finite(stats.generation_tokens_per_s)),
        ),
        (
            "skymoe_kv_cache_usage_ratio",
            "gauge",
            "Fraction of KV-cache blocks in use.",
            format!("{}", finite(kv_ratio)),
        ),
        (
            "skymoe_kv_cache_blocks_used",
            "gauge",
            "KV-cache blocks in use.",
            stats.kv_blocks_used.to_string(),
        ),
        (
            "skymoe_kv_cache_blocks_total",
            "gauge",
            "KV-cache blocks in all.",
            stats.kv_blocks_total.to_string(),
        ),
        (
            "skymoe_preemptions_total",
            "counter",
            "Running requests preempted because the KV cache was full.",
            stats.preemptions_total.to_string(),
        ),
    ];
    for (name, kind, help, value) in rows.iter().chain(&prefix_cache_rows(stats)) {
        family(&mut out, name, kind, help);
        sample(&mut out, name, &m, value);
    }
    family(
        &mut out,
        "skymoe_http_responses_total",
        "counter",
        "HTTP responses by route and status code.",
    );
    for ((route, status), n) in http {
        sample(
            &mut out,
            "skymoe_http_responses_total",
            &format!("route=\"{}\",code=\"{status}\"", escape_label(route)),
            n,
        );
    }
    out
}

/// The prefix cache's families: prompt tokens and full blocks looked up and found, the hit
/// ratio (of tokens), blocks holding cached contents and evictions.
fn prefix_cache_rows(
    stats: &EngineStats,
) -> [(&'static str, &'static str, &'static str, String); 7] {
    let p = &stats.prefix_cache;
    let ratio = if p.queried_tokens > 0 {
        p.hit_tokens as f64 / p.queried_tokens as f64
    } else {
        0.0
    };
    [
        (
            "skymoe_prefix_cache_queries_tokens_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            p.queried_tokens.to_string(),
        ),
        (
            "skymoe_prefix_cache_hits_tokens_total",
            "counter",
            "Prompt tokens whose keys and values were found in the prefix cache.",
            p.hit_tokens.to_string(),
        ),
        (
            "skymoe_prefix_cache_queries_blocks_total",
            "counter",
            "Full prompt blocks that could have been taken from the prefix cache.",
            p.queried_blocks.to_string(),
        ),
        (
            "skymoe_prefix_cache_hits_blocks_total",
            "counter",
            "Full prompt blocks taken from the prefix cache.",
            p.hit_blocks.to_string(),
        ),
        (
            "skymoe_prefix_cache_hit_ratio",
            "gauge",
            "Prompt tokens found in the prefix cache over prompt tokens looked up, since start.",
            format!("{}", finite(ratio)),
        ),
        (
            "skymoe_prefix_cache_blocks",
            "gauge",
            "KV-cache blocks holding cached prefix contents (in use or free).",
            stats.prefix_cache_blocks.to_string(),
        ),
        (
            "skymoe_prefix_cache_evictions_total",
            "counter",
            "Cached blocks whose contents were dropped to make room.",
            p.evictions.to_string(),
        ),
    ]
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_and_type() {
        let stats = EngineStats {
            requests_total: 3,
            kv_blocks_used: 1,
            kv_blocks_total: 4,
            prefix_cache: crate::kv_cache::PrefixCacheStats {
                queried_tokens: 64,
                hit_tokens: 32,
                ..Default::default()
            },
            ..Default::default()
        };
        let http = HttpCounters::default();
        http.record("/v1/completions", 200);
        http.record("/v1/completions", 200);
        let text = render("m\"x", &stats, &http.snapshot());
        assert!(text.contains("# TYPE skymoe_requests_total counter"));
        assert!(text.contains("skymoe_requests_total{model_name=\"m\\\"x\"} 3"));
        assert!(text.contains("skymoe_kv_cache_usage_ratio{model_name=\"m\\\"x\"} 0.25"));
        assert!(text.contains("# TYPE skymoe_prefix_cache_hits_tokens_total counter"));
        assert!(text.contains("skymoe_prefix_cache_hit_ratio{model_name=\"m\\\"x\"} 0.5"));
        assert!(
            text.contains("skymoe_http_responses_total{route=\"/v1/completions\",code=\"200\"} 2")
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}

//! The registry's text (Prometheus format 0.0.4) as OTLP metrics.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    Sum,
};

use crate::metrics::PREFIX;

/// One family of the text format.
#[derive(Debug, Default)]
pub(super) struct Family {
    pub name: String,
    pub help: String,
    pub kind: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug)]
pub(super) struct Sample {
    /// The sample's own name (`…_bucket`, `…_sum`, `…_total`, …).
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: String,
}

/// Families of the Prometheus text format (version 0.0.4), as
/// `prometheus-client` writes them: `# HELP` and `# TYPE` before samples.
pub(super) fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(Family {
                name: name.to_string(),
                help: help.replace("\\n", "\n").replace("\\\\", "\\"),
                ..Family::default()
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match families.last_mut() {
                Some(f) if f.name == name => f.kind = kind.to_string(),
                _ => families.push(Family {
                    name: name.to_string(),
                    kind: kind.to_string(),
                    ..Family::default()
                }),
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            if let (Some(sample), Some(f)) = (parse_sample(line), families.last_mut()) {
                f.samples.push(sample);
            }
        }
    }
    families
}

/// `name{k="v",…} value`, label values unescaped.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut inside) = rest.strip_prefix('{') {
        loop {
            inside = inside.trim_start_matches(',');
            if let Some(after) = inside.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = inside.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            inside = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.to_string();
    Some(Sample { name, labels, value })
}

/// OpenTelemetry's name and unit of a Prometheus family name.
fn otel_name(name: &str, kind: &str) -> (String, &'static str) {
    let name = if kind == "counter" {
        name.strip_suffix("_total").unwrap_or(name)
    } else {
        name
    };
    let (name, unit) = match name.strip_suffix("_seconds") {
        Some(n) => (n, "s"),
        None => (name, ""),
    };
    let name = match name.strip_prefix(PREFIX).and_then(|n| n.strip_prefix('_')) {
        Some(rest) => format!("{PREFIX}.{rest}"),
        None => name.to_string(),
    };
    (name, unit)
}

fn attributes(labels: &[(String, String)]) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.clone())),
            }),
        })
        .collect()
}

fn number(s: &Sample, start: u64, now: u64) -> NumberDataPoint {
    let value = match s.value.parse::<i64>() {
        Ok(i) => number_data_point::Value::AsInt(i),
        Err(_) => number_data_point::Value::AsDouble(s.value.parse().unwrap_or(f64::NAN)),
    };
    NumberDataPoint {
        attributes: attributes(&s.labels),
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(value),
        ..Default::default()
    }
}

/// Every family of the text as an OTLP metric (cumulative since `start`).
pub(super) fn to_otlp(text: &str, start: u64, now: u64) -> Vec<Metric> {
    parse(text)
        .into_iter()
        .filter(|f| !f.samples.is_empty())
        .filter_map(|f| {
            let cumulative = AggregationTemporality::Cumulative as i32;
            let data = match f.kind.as_str() {
                "counter" => metric::Data::Sum(Sum {
                    data_points: f.samples.iter().map(|s| number(s, start, now)).collect(),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                "gauge" => metric::Data::Gauge(Gauge {
                    data_points: f.samples.iter().map(|s| number(s, start, now)).collect(),
                }),
                "histogram" => metric::Data::Histogram(Histogram {
                    data_points: histogram_points(&f, start, now),
                    aggregation_temporality: cumulative,
                }),
                _ => return None,
            };
            let (name, unit) = otel_name(&f.name, &f.kind);
            Some(Metric {
                name,
                description: f.help,
                unit: unit.into(),
                data: Some(data),
                ..Default::default()
            })
        })
        .collect()
}

/// Groups a histogram's `_bucket`/`_sum`/`_count` samples by label set; the
/// text's cumulative buckets become OTLP's per-bucket counts.
fn histogram_points(f: &Family, start: u64, now: u64) -> Vec<HistogramDataPoint> {
    // Per label set: the point, and its (bound, cumulative count) buckets.
    type Point = (Vec<(String, String)>, HistogramDataPoint, Vec<(f64, u64)>);
    let mut points: Vec<Point> = Vec::new();
    for s in &f.samples {
        let labels: Vec<(String, String)> = s.labels.iter().filter(|(k, _)| k != "le").cloned().collect();
        let i = match points.iter().position(|(l, _, _)| *l == labels) {
            Some(i) => i,
            None => {
                let point = HistogramDataPoint {
                    attributes: attributes(&labels),
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    ..Default::default()
                };
                points.push((labels, point, Vec::new()));
                points.len() - 1
            }
        };
        let (_, point, buckets) = &mut points[i];
        let suffix = s.name.strip_prefix(f.name.as_str()).unwrap_or("");
        match suffix {
            "_bucket" => {
                let le = s.labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v.as_str());
                let bound = match le {
                    Some("+Inf") => f64::INFINITY,
                    Some(b) => b.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                buckets.push((bound, s.value.parse().unwrap_or(0)));
            }
            "_sum" => point.sum = s.value.parse().ok(),
            "_count" => point.count = s.value.parse().unwrap_or(0),
            _ => {}
        }
    }
    points
        .into_iter()
        .map(|(_, mut point, mut buckets)| {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut below = 0;
            for (bound, cumulative) in buckets {
                point.bucket_counts.push(cumulative.saturating_sub(below));
                below = cumulative;
                if bound.is_finite() {
                    point.explicit_bounds.push(bound);
                }
            }
            point
        })
        .collect()
}

//! Reading the samples of a Prometheus text exposition (the admin
//! listener's `/metrics`), for `atoll node status`.

/// One sample line: `name{label="value",...} number`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name, with any `_bucket`/`_sum`/`_count` suffix.
    pub name: String,
    /// Labels in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    /// The sample's value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of `text`. Comments, blank lines and lines that do not
/// parse are skipped: a summary should show what it can read.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        rest = after;
    }
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",...}` and returns the labels and what follows the brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

/// The smallest bucket bound that holds fraction `q` of the observations of
/// a histogram, given its cumulative buckets as (upper bound, count); None
/// without observations. Prometheus buckets give no finer answer.
pub fn quantile_bound(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.iter().map(|(_, n)| *n).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    let mut sorted = buckets.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let target = q * total;
    sorted
        .iter()
        .find(|(_, cumulative)| *cumulative >= target)
        .map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_escaped_labels_and_values() {
        let text = "# HELP x y\n# TYPE x counter\n\
            atoll_requests_total{tenant=\"a\\\"b\\\\c\",status=\"200\"} 2\n\
            atoll_unrouted_requests_total 7\n\
            bucket{le=\"+Inf\"} 3 1700000000\n\
            \n\
            broken{tenant=\"x} 1\n\
            also broken\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(samples[0].name, "atoll_requests_total");
        assert_eq!(samples[0].label("tenant"), Some("a\"b\\c"));
        assert_eq!(samples[0].label("status"), Some("200"));
        assert_eq!(samples[0].value, 2.0);
        assert_eq!(samples[1].name, "atoll_unrouted_requests_total");
        assert!(samples[1].labels.is_empty());
        assert_eq!(samples[1].value, 7.0);
        assert_eq!(samples[2].label("le"), Some("+Inf"));
        assert_eq!(samples[2].value, 3.0);
    }

    #[test]
    fn quantiles_come_from_the_first_bucket_that_holds_them() {
        // 10 observations: 6 under 1 ms, 3 more under 5 ms, 1 above 5 s.
        let buckets = [
            (0.005, 9.0),
            (0.001, 6.0),
            (5.0, 9.0),
            (f64::INFINITY, 10.0),
        ];
        assert_eq!(quantile_bound(&buckets, 0.5), Some(0.001));
        assert_eq!(quantile_bound(&buckets, 0.6), Some(0.001));
        assert_eq!(quantile_bound(&buckets, 0.9), Some(0.005));
        assert_eq!(quantile_bound(&buckets, 0.99), Some(f64::INFINITY));
        assert_eq!(quantile_bound(&[(0.001, 0.0)], 0.5), None);
    }
}

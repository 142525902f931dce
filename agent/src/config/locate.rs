//! Maps byte spans and dotted key paths back to line and column, so every
//! config error points at the place to fix.

use std::ops::Range;

use toml_edit::{Document, Item, Table, Value};

/// Every key in the document with the span of its key and of its value.
pub(super) struct Locator {
    text: String,
    /// (dotted path, key span, value span)
    entries: Vec<(String, Range<usize>, Range<usize>)>,
}

impl Locator {
    pub(super) fn new(text: &str) -> Locator {
        let mut entries = Vec::new();
        if let Ok(doc) = Document::parse(text.to_string()) {
            walk_table(doc.as_table(), "", &mut entries);
        }
        Locator {
            text: text.to_string(),
            entries,
        }
    }

    /// 1-based line and column of a byte offset.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.chars().count(), |i| before[i + 1..].chars().count())
            + 1;
        (line, col)
    }

    /// Position and key for a parse error's span: the innermost entry whose
    /// key or value covers the span.
    pub(super) fn at_span(&self, span: Option<Range<usize>>) -> (usize, usize, String) {
        let Some(span) = span else {
            return (1, 1, "(document)".to_string());
        };
        let (line, col) = self.line_col(span.start);
        let covers = |r: &Range<usize>| r.start <= span.start && span.end <= r.end.max(r.start + 1);
        let key = self
            .entries
            .iter()
            .filter(|(_, k, v)| covers(k) || covers(v))
            .min_by_key(|(_, k, v)| (v.end - k.start, usize::MAX - k.start))
            .map(|(p, _, _)| p.clone())
            .unwrap_or_else(|| "(document)".to_string());
        (line, col, key)
    }

    /// Position of a dotted key path; falls back to its nearest parent, then
    /// to the top of the file.
    pub(super) fn at_key(&self, key: &str) -> (usize, usize) {
        let mut path = key.to_string();
        loop {
            if let Some((_, k, _)) = self.entries.iter().find(|(p, _, _)| *p == path) {
                return self.line_col(k.start);
            }
            match path.rfind(['.', '[']) {
                Some(i) => path.truncate(i),
                None => return (1, 1),
            }
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn walk_table(t: &Table, prefix: &str, out: &mut Vec<(String, Range<usize>, Range<usize>)>) {
    for (key, item) in t.iter() {
        let path = join(prefix, key);
        let kspan = t
            .key(key)
            .and_then(|k| k.span())
            .or_else(|| item.span())
            .unwrap_or(0..0);
        let vspan = item.span().unwrap_or(kspan.clone());
        out.push((path.clone(), kspan.clone(), vspan));
        walk_item(item, &path, out);
    }
}

fn walk_item(item: &Item, path: &str, out: &mut Vec<(String, Range<usize>, Range<usize>)>) {
    match item {
        Item::Table(t) => walk_table(t, path, out),
        Item::ArrayOfTables(a) => {
            for (i, t) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                let span = t.span().unwrap_or(0..0);
                out.push((p.clone(), span.clone(), span));
                walk_table(t, &p, out);
            }
        }
        Item::Value(v) => walk_value(v, path, out),
        Item::None => {}
    }
}

fn walk_value(v: &Value, path: &str, out: &mut Vec<(String, Range<usize>, Range<usize>)>) {
    match v {
        Value::InlineTable(t) => {
            for (key, val) in t.iter() {
                let p = join(path, key);
                let kspan = t
                    .key(key)
                    .and_then(|k| k.span())
                    .or_else(|| val.span())
                    .unwrap_or(0..0);
                let vspan = val.span().unwrap_or(kspan.clone());
                out.push((p.clone(), kspan, vspan));
                walk_value(val, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, val) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                let span = val.span().unwrap_or(0..0);
                out.push((p.clone(), span.clone(), span));
                walk_value(val, &p, out);
            }
        }
        _ => {}
    }
}

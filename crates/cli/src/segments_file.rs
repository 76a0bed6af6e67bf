//! Segment files for `dynseg segment validate|apply -f`: a JSON list, or a YAML
//! list of maps with `id`, `name`, `description` and `rule` (plain, quoted, or
//! `|`/`>` block values), and optionally `webhooks`, a list of `url` and
//! `secret_env`. Rule errors are shown under the rule text with a caret.

use dynseg_proto::pb;
use serde_json::Value as Json;

use crate::error::CliError;

/// Reads segments from a file's text (JSON when it starts with `[`).
pub fn parse(text: &str) -> Result<Vec<pb::SegmentDef>, CliError> {
    Ok(SegmentsFile::read("segments file", text)?.defs)
}

/// A segments file as read: its segments, and where each rule's text sits in
/// it, so that a rule error is shown at its line and column in the file.
pub struct SegmentsFile {
    /// The segments, in the file's order.
    pub defs: Vec<pb::SegmentDef>,
    name: String,
    lines: Vec<String>,
    /// Per segment (same order): where its rule's text is in the file. Empty
    /// when it is not known (JSON files, quoted rules with escapes).
    rules: Vec<Vec<Piece>>,
}

/// A run of a rule's text that is a run of a file line: the rule's line
/// `rule_line` from column `rule_column` on, `len` characters, is the file's
/// line `line` from column `column` on (all 1-based, columns in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    rule_line: usize,
    rule_column: usize,
    len: usize,
    line: usize,
    column: usize,
}

impl SegmentsFile {
    /// Reads the file `name`'s `text` (JSON when it starts with `[`).
    pub fn read(name: &str, text: &str) -> Result<SegmentsFile, CliError> {
        let (defs, rules) = if text.trim_start().starts_with('[') {
            let defs = parse_json(text)?;
            let rules = vec![Vec::new(); defs.len()];
            (defs, rules)
        } else {
            parse_yaml(text)?
        };
        Ok(SegmentsFile {
            defs,
            name: name.to_owned(),
            lines: text.lines().map(str::to_owned).collect(),
            rules,
        })
    }

    /// Where the rule of segment `id`, at its `line:column`, is in the file.
    fn locate(&self, id: &str, line: usize, column: usize) -> Option<(usize, usize)> {
        let index = self.defs.iter().position(|d| d.id == id)?;
        self.rules.get(index)?.iter().find_map(|p| {
            (p.rule_line == line && (p.rule_column..=p.rule_column + p.len).contains(&column))
                .then(|| (p.line, p.column + (column - p.rule_column)))
        })
    }

    /// Renders a refusal's message: each rule error in it (`segment ID:
    /// LINE:COL: message`, one a line) as `FILE:LINE:COL: segment ID:
    /// message` with the file's line and a caret under the column, or, where
    /// the file position is not known, with the rule's line and a caret.
    /// Other lines are kept as they are.
    pub fn explain(&self, message: &str) -> String {
        message
            .lines()
            .map(|line| self.explain_line(line).unwrap_or_else(|| line.to_owned()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn explain_line(&self, message: &str) -> Option<String> {
        let at = message.find("segment ")?;
        let rest = &message[at + "segment ".len()..];
        let (id, rest) = rest.split_once(": ")?;
        let (line, rest) = rest.split_once(':')?;
        let (column, detail) = rest.split_once(": ")?;
        let line: usize = line.parse().ok()?;
        let column: usize = column.parse().ok()?;
        if let Some((file_line, file_column)) = self.locate(id, line, column) {
            let text = self.lines.get(file_line - 1)?;
            return Some(format!(
                "{}:{file_line}:{file_column}: segment {id}: {detail}\n  {text}\n  {}^",
                self.name,
                " ".repeat(file_column - 1)
            ));
        }
        let def = self.defs.iter().find(|d| d.id == id)?;
        let text = def.rule.lines().nth(line.checked_sub(1)?)?;
        Some(format!(
            "segment {id}, rule line {line}, column {column}: {detail}\n  {text}\n  {}^",
            " ".repeat(column.saturating_sub(1))
        ))
    }
}

/// Characters before byte `offset` of `text`.
fn chars_before(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |head| head.chars().count())
}

fn parse_json(text: &str) -> Result<Vec<pb::SegmentDef>, CliError> {
    let json: Json =
        serde_json::from_str(text).map_err(|e| CliError::User(format!("segments file: {e}")))?;
    let Json::Array(items) = json else {
        return Err(CliError::User("segments file: expected a list".into()));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |key: &str| {
                item.get(key)
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let webhooks = match item.get("webhooks") {
                None | Some(Json::Null) => Vec::new(),
                Some(Json::Array(hooks)) => hooks
                    .iter()
                    .map(|h| pb::Webhook {
                        url: h
                            .get("url")
                            .and_then(Json::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        secret_env: h
                            .get("secret_env")
                            .and_then(Json::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    })
                    .collect(),
                Some(_) => {
                    return Err(CliError::User(format!(
                        "segment {}: webhooks must be a list of {{url, secret_env}}",
                        i + 1
                    )));
                }
            };
            let def = pb::SegmentDef {
                id: field("id"),
                name: field("name"),
                description: field("description"),
                rule: field("rule"),
                webhooks,
            };
            check_required(&def, &format!("segment {}", i + 1))?;
            Ok(def)
        })
        .collect()
}

fn check_required(def: &pb::SegmentDef, at: &str) -> Result<(), CliError> {
    if def.id.is_empty() || def.rule.is_empty() {
        return Err(CliError::User(format!(
            "{at}: every segment needs an id and a rule"
        )));
    }
    Ok(())
}

fn unquote(value: &str, line: usize) -> Result<String, CliError> {
    let value = value.trim();
    let bad = || CliError::User(format!("line {line}: unterminated quoted value"));
    if let Some(inner) = value.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or_else(bad)?;
        Ok(inner.replace("\\\"", "\"").replace("\\\\", "\\"))
    } else if let Some(inner) = value.strip_prefix('\'') {
        Ok(inner.strip_suffix('\'').ok_or_else(bad)?.replace("''", "'"))
    } else {
        Ok(value.to_owned())
    }
}

type Parsed = (Vec<pb::SegmentDef>, Vec<Vec<Piece>>);

fn parse_yaml(text: &str) -> Result<Parsed, CliError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut segments: Vec<pb::SegmentDef> = Vec::new();
    let mut rules: Vec<Vec<Piece>> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let raw = lines[i];
        let number = i + 1;
        i += 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
            continue;
        }
        let entry = if let Some(rest) = trimmed.strip_prefix("- ") {
            segments.push(pb::SegmentDef::default());
            rules.push(Vec::new());
            rest
        } else {
            trimmed
        };
        let Some(current) = segments.last_mut() else {
            return Err(CliError::User(format!(
                "line {number}: expected a list item (- id: ...)"
            )));
        };
        let (key, value) = entry
            .split_once(':')
            .ok_or_else(|| CliError::User(format!("line {number}: expected key: value")))?;
        // Where the value starts in the line: after the key's colon and the
        // spaces that follow it.
        let entry_at = (raw.len() - raw.trim_start().len()) + (trimmed.len() - entry.len());
        let value_at = entry_at + key.len() + 1 + (value.len() - value.trim_start().len());
        let value = value.trim();
        if key.trim() == "webhooks" && value.is_empty() {
            // A nested list: `- url: ...` items with `secret_env: ...`, indented
            // deeper than `webhooks:`.
            let indent = raw.len() - raw.trim_start().len()
                + usize::from(raw.trim_start().starts_with("- ")) * 2;
            while i < lines.len() {
                let next = lines[i];
                let trimmed = next.trim();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    i += 1;
                    continue;
                }
                if next.len() - next.trim_start().len() <= indent {
                    break;
                }
                let line = i + 1;
                i += 1;
                let field = if let Some(rest) = trimmed.strip_prefix("- ") {
                    current.webhooks.push(pb::Webhook::default());
                    rest
                } else {
                    trimmed
                };
                let Some(hook) = current.webhooks.last_mut() else {
                    return Err(CliError::User(format!(
                        "line {line}: expected a webhook (- url: ...)"
                    )));
                };
                let (k, v) = field
                    .split_once(':')
                    .ok_or_else(|| CliError::User(format!("line {line}: expected key: value")))?;
                let v = unquote(v, line)?;
                match k.trim() {
                    "url" => hook.url = v,
                    "secret_env" => hook.secret_env = v,
                    other => {
                        return Err(CliError::User(format!(
                            "line {line}: unknown webhook key {other:?} (url, secret_env)"
                        )));
                    }
                }
            }
            continue;
        }
        let mut pieces = Vec::new();
        let value = if value == "|" || value == ">" {
            // A block scalar: the following lines indented deeper than the key.
            let indent = raw.len() - raw.trim_start().len();
            let mut block = Vec::new();
            let mut sources = Vec::new();
            while i < lines.len() {
                let next = lines[i];
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty()
                    && next_indent <= indent + usize::from(raw.trim_start().starts_with("- ")) * 2
                {
                    break;
                }
                block.push(next.trim());
                sources.push((i + 1, chars_before(next, next_indent) + 1, next.trim()));
                i += 1;
            }
            let joiner = if value == "|" { "\n" } else { " " };
            let joined = block.join(joiner).trim().to_owned();
            pieces = block_pieces(&sources, value == "|");
            joined
        } else {
            let unquoted = unquote(value, number)?;
            let quoted = value.starts_with(['"', '\'']);
            // A quoted value with escapes is shorter than its text: its
            // columns are not the line's (rare: rules need no escapes).
            if !quoted || unquoted.len() + 2 == value.len() {
                pieces.push(Piece {
                    rule_line: 1,
                    rule_column: 1,
                    len: unquoted.chars().count(),
                    line: number,
                    column: chars_before(raw, value_at) + 1 + usize::from(quoted),
                });
            }
            unquoted
        };
        match key.trim() {
            "id" => current.id = value,
            "name" => current.name = value,
            "description" => current.description = value,
            "rule" => {
                current.rule = value;
                if let Some(source) = rules.last_mut() {
                    *source = pieces;
                }
            }
            other => {
                return Err(CliError::User(format!(
                    "line {number}: unknown key {other:?}"
                )));
            }
        }
    }
    for (i, def) in segments.iter().enumerate() {
        check_required(def, &format!("segment {}", i + 1))?;
    }
    if segments.is_empty() {
        return Err(CliError::User("segments file: no segments".into()));
    }
    Ok((segments, rules))
}

/// The pieces of a block rule from its lines (`(file line, column of the
/// text, text)`): a literal block (`|`) keeps a rule line per file line, a
/// folded one (`>`) joins them with spaces into one. Leading empty lines are
/// not part of the rule (the value is trimmed).
fn block_pieces(lines: &[(usize, usize, &str)], literal: bool) -> Vec<Piece> {
    let first = lines.iter().position(|(_, _, text)| !text.is_empty());
    let mut pieces = Vec::new();
    let (mut rule_line, mut rule_column) = (1, 1);
    for &(line, column, text) in first.map_or(&[][..], |first| &lines[first..]) {
        let len = text.chars().count();
        pieces.push(Piece {
            rule_line,
            rule_column,
            len,
            line,
            column,
        });
        if literal {
            rule_line += 1;
        } else {
            rule_column += len + 1;
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_lists_read_the_same() {
        let yaml = r#"
# the first two SPEC segments
- id: repeat_buyers
  name: Repeat buyers
  rule: count(order_completed) in last 90d >= 2
- id: shoes
  description: 'viewed shoes, bought none'
  rule: |
    count(product_viewed where category == "shoes") in last 7d >= 3
    and not exists(order_completed) in last 7d
"#;
        let from_yaml = parse(yaml).unwrap();
        assert_eq!(from_yaml.len(), 2);
        assert_eq!(from_yaml[0].name, "Repeat buyers");
        assert_eq!(from_yaml[1].description, "viewed shoes, bought none");
        assert!(
            from_yaml[1]
                .rule
                .starts_with("count(product_viewed where category == \"shoes\")")
        );
        assert!(from_yaml[1].rule.ends_with("in last 7d"));
        let with_hooks = parse(
            "- id: vip\n  webhooks:\n    - url: http://crm.local/hook\n      secret_env: CRM_SECRET\n    - url: 'https://b.example/x'\n      secret_env: B\n  rule: exists(order)\n",
        )
        .unwrap();
        let hooks: Vec<(&str, &str)> = with_hooks[0]
            .webhooks
            .iter()
            .map(|w| (w.url.as_str(), w.secret_env.as_str()))
            .collect();
        assert_eq!(
            hooks,
            vec![
                ("http://crm.local/hook", "CRM_SECRET"),
                ("https://b.example/x", "B")
            ]
        );
        assert_eq!(with_hooks[0].rule, "exists(order)");
        let as_json = parse(
            r#"[{"id":"vip","rule":"exists(order)","webhooks":[{"url":"http://crm.local/hook","secret_env":"CRM_SECRET"},{"url":"https://b.example/x","secret_env":"B"}]}]"#,
        )
        .unwrap();
        assert_eq!(as_json, with_hooks);
        assert!(parse("- id: x\n  rule: exists(a)\n  webhooks:\n    - colour: red\n").is_err());
        let json = r#"[{"id":"repeat_buyers","name":"Repeat buyers","rule":"count(order_completed) in last 90d >= 2"}]"#;
        assert_eq!(parse(json).unwrap()[0], from_yaml[0]);
        assert!(parse("- id: x\n").is_err());
        assert!(parse("- id: x\n  colour: red\n  rule: exists(a)\n").is_err());
    }

    #[test]
    fn the_example_file_holds_exactly_the_spec_segments() {
        let parsed = parse(include_str!("../../../docs/examples/segments.yaml")).unwrap();
        let got: Vec<(String, String)> = parsed.into_iter().map(|d| (d.id, d.rule)).collect();
        let want: Vec<(String, String)> = dynseg_rules::examples::SPEC_SEGMENTS
            .iter()
            .map(|(id, rule)| ((*id).to_owned(), (*rule).to_owned()))
            .collect();
        assert_eq!(got, want);
    }

    /// The message the control plane sends for an error in segment `id`'s
    /// rule at the first `marker` of the rule's line `line`.
    fn error_at(file: &SegmentsFile, id: &str, line: usize, marker: &str) -> String {
        let rule = &file.defs.iter().find(|d| d.id == id).unwrap().rule;
        let text = rule.lines().nth(line - 1).unwrap();
        let column = text.find(marker).unwrap() + 1;
        format!("segment {id}: {line}:{column}: bad here")
    }

    /// `FILE:LINE:COL` of the first `marker` on the file line holding `on`.
    fn file_position(text: &str, on: &str, marker: &str) -> (usize, usize) {
        let (index, line) = text
            .lines()
            .enumerate()
            .find(|(_, l)| l.contains(on))
            .unwrap();
        (index + 1, line.find(marker).unwrap() + 1)
    }

    fn shown_at(text: &str, on: &str, marker: &str, id: &str) -> String {
        let (line, column) = file_position(text, on, marker);
        let file_line = text.lines().nth(line - 1).unwrap();
        format!(
            "f.yaml:{line}:{column}: segment {id}: bad here\n  {file_line}\n  {}^",
            " ".repeat(column - 1)
        )
    }

    #[test]
    fn a_rule_error_is_shown_at_its_line_and_column_in_the_file() {
        let text = "- id: plain\n  rule: count(order_completed) >=   \n\
                    - id: quoted\n  rule:   \"exists(login) and 1 <\"\n\
                    - id: literal\n  rule: |\n\n    exists(login)\n      and plan == \n\
                    - id: folded\n  rule: >\n    exists(login)\n    or sum(x.v) in last 0d > 1\n";
        let file = SegmentsFile::read("f.yaml", text).unwrap();
        let cases = [
            ("plain", 1, ">=", "count(order_completed)"),
            ("quoted", 1, "<", "and 1 <"),
            ("literal", 2, "==", "and plan =="),
            ("folded", 1, "0d", "in last 0d"),
        ];
        for (id, line, marker, on) in cases {
            assert_eq!(
                file.explain(&error_at(&file, id, line, marker)),
                shown_at(text, on, marker, id),
                "{id}"
            );
        }
        // One line per error, each rendered (the refusal's own prefix goes:
        // the file position says what it is); other lines are kept.
        let message = format!(
            "invalid rule: {}\n{}\nsomething else",
            error_at(&file, "plain", 1, ">="),
            error_at(&file, "folded", 1, "0d")
        );
        let shown = file.explain(&message);
        assert_eq!(
            shown,
            format!(
                "{}\n{}\nsomething else",
                shown_at(text, "count(order_completed)", ">=", "plain"),
                shown_at(text, "in last 0d", "0d", "folded")
            ),
        );
    }

    #[test]
    fn a_rule_whose_place_in_the_file_is_unknown_is_shown_under_its_own_line() {
        // JSON carries no positions; the rule's own line and column are shown.
        let json = r#"[{"id": "bad", "rule": "count(order_completed) >="}]"#;
        let file = SegmentsFile::read("f.json", json).unwrap();
        assert_eq!(
            file.explain("invalid rule: segment bad: 1:26: expected a number"),
            "segment bad, rule line 1, column 26: expected a number\n  count(order_completed) >=\n                           ^"
        );
        // A quoted rule with an escape is shorter than its text in the file.
        let yaml = "- id: esc\n  rule: \"plan == \\\"a\\\" and\"\n";
        let file = SegmentsFile::read("f.yaml", yaml).unwrap();
        assert_eq!(file.defs[0].rule, "plan == \"a\" and");
        assert!(
            file.explain(&error_at(&file, "esc", 1, "and"))
                .starts_with("segment esc, rule line 1, column "),
        );
    }
}

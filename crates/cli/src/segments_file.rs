//! Segment files for `dynseg segment validate|apply -f`: a JSON list, or a YAML
//! list of maps with `id`, `name`, `description` and `rule` (plain, quoted, or
//! `|`/`>` block values), and optionally `webhooks`, a list of `url` and
//! `secret_env`. Rule errors are shown under the rule text with a caret.

use dynseg_proto::pb;
use serde_json::Value as Json;

use crate::error::CliError;

/// Reads segments from a file's text (JSON when it starts with `[`).
pub fn parse(text: &str) -> Result<Vec<pb::SegmentDef>, CliError> {
    if text.trim_start().starts_with('[') {
        parse_json(text)
    } else {
        parse_yaml(text)
    }
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

fn parse_yaml(text: &str) -> Result<Vec<pb::SegmentDef>, CliError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut segments: Vec<pb::SegmentDef> = Vec::new();
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
        let value = if value == "|" || value == ">" {
            // A block scalar: the following lines indented deeper than the key.
            let indent = raw.len() - raw.trim_start().len();
            let mut block = Vec::new();
            while i < lines.len() {
                let next = lines[i];
                let next_indent = next.len() - next.trim_start().len();
                if !next.trim().is_empty()
                    && next_indent <= indent + usize::from(raw.trim_start().starts_with("- ")) * 2
                {
                    break;
                }
                block.push(next.trim());
                i += 1;
            }
            let joiner = if value == "|" { "\n" } else { " " };
            block.join(joiner).trim().to_owned()
        } else {
            unquote(value, number)?
        };
        match key.trim() {
            "id" => current.id = value,
            "name" => current.name = value,
            "description" => current.description = value,
            "rule" => current.rule = value,
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
    Ok(segments)
}

/// Renders a rule error (`segment ID: LINE:COL: message`) with the rule's line
/// and a caret under the column, when the message names a segment in `defs`.
pub fn explain(message: &str, defs: &[pb::SegmentDef]) -> String {
    let rendered = (|| {
        let at = message.find("segment ")?;
        let rest = &message[at + "segment ".len()..];
        let (id, rest) = rest.split_once(": ")?;
        let (line, rest) = rest.split_once(':')?;
        let (column, detail) = rest.split_once(": ")?;
        let line: usize = line.parse().ok()?;
        let column: usize = column.parse().ok()?;
        let def = defs.iter().find(|d| d.id == id)?;
        let text = def.rule.lines().nth(line.checked_sub(1)?)?;
        Some(format!(
            "segment {id}, rule line {line}, column {column}: {detail}\n  {text}\n  {}^",
            " ".repeat(column.saturating_sub(1))
        ))
    })();
    rendered.unwrap_or_else(|| message.to_owned())
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

    #[test]
    fn rule_errors_point_at_the_column() {
        let defs = vec![pb::SegmentDef {
            id: "bad".into(),
            rule: "count(order_completed) >=".into(),
            ..Default::default()
        }];
        let shown = explain("invalid rule: segment bad: 1:26: expected a number", &defs);
        assert_eq!(
            shown,
            "segment bad, rule line 1, column 26: expected a number\n  count(order_completed) >=\n                           ^"
        );
    }
}

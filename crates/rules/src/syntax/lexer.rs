//! Turns rule text into tokens with positions.

use std::fmt;

use super::ast::Pos;
use crate::error::RuleError;
use crate::time::{Span, Timestamp};

/// One token.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Token {
    /// A bare word: keyword, function, trait, event or property name.
    Ident(String),
    /// A name in backticks: never a keyword.
    Quoted(String),
    /// A string literal in double quotes.
    Str(String),
    /// A number literal (unsigned; the parser handles a leading minus).
    Number(f64),
    /// A number with a time unit: `90d`.
    Duration(Span),
    /// A number with an ordinal suffix: `5th`.
    Ordinal(u32),
    /// `@2026-01-01T00:00:00Z`.
    Time(Timestamp),
    /// Punctuation and operators.
    Sym(&'static str),
    /// End of input.
    Eof,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Ident(s) => write!(f, "'{s}'"),
            Token::Quoted(s) => write!(f, "`{s}`"),
            Token::Str(s) => write!(f, "string {s:?}"),
            Token::Number(n) => write!(f, "number {n}"),
            Token::Duration(d) => write!(f, "duration {d}"),
            Token::Ordinal(n) => write!(f, "'{n}{}'", super::ast::ordinal_suffix(*n)),
            Token::Time(t) => write!(f, "timestamp @{t}"),
            Token::Sym(s) => write!(f, "'{s}'"),
            Token::Eof => f.write_str("end of rule"),
        }
    }
}

/// A token and where it starts.
#[derive(Clone, Debug)]
pub(crate) struct Lexed {
    pub(crate) token: Token,
    pub(crate) pos: Pos,
}

/// True when `name` lexes as one bare identifier.
pub fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

const SYMBOLS: [&str; 14] = [
    "==", "!=", "<=", ">=", "<", ">", "(", ")", "[", "]", ",", ".", "+", "-",
];

/// Splits `text` into tokens, ending with [`Token::Eof`].
pub(crate) fn lex(text: &str) -> Result<Vec<Lexed>, RuleError> {
    let mut lexer = Lexer {
        chars: text.chars().collect(),
        at: 0,
        line: 1,
        column: 1,
    };
    let mut out = Vec::new();
    loop {
        lexer.skip_space_and_comments();
        let pos = lexer.pos();
        let Some(c) = lexer.peek() else {
            out.push(Lexed {
                token: Token::Eof,
                pos,
            });
            return Ok(out);
        };
        let token = if c.is_ascii_alphabetic() || c == '_' {
            Token::Ident(lexer.take_while(|c| c.is_ascii_alphanumeric() || c == '_'))
        } else if c.is_ascii_digit() {
            lexer.number(pos)?
        } else if c == '"' {
            Token::Str(lexer.delimited('"', pos)?)
        } else if c == '`' {
            Token::Quoted(lexer.delimited('`', pos)?)
        } else if c == '@' {
            lexer.bump();
            let text = lexer.take_while(|c| c.is_ascii_alphanumeric() || ":.+-".contains(c));
            let time = Timestamp::parse_rfc3339(&text).map_err(|e| {
                RuleError::new(
                    pos,
                    format!(
                        "expected a timestamp like @2026-01-31T00:00:00Z after '@': {}",
                        e.reason
                    ),
                )
            })?;
            Token::Time(time)
        } else if let Some(sym) = SYMBOLS.iter().find(|s| lexer.starts_with(s)) {
            for _ in 0..sym.len() {
                lexer.bump();
            }
            Token::Sym(sym)
        } else if c == '=' || c == '!' {
            let hint = if c == '=' {
                "'==' to compare"
            } else {
                "'!=' or 'not'"
            };
            return Err(RuleError::new(
                pos,
                format!("unexpected '{c}': expected {hint}"),
            ));
        } else {
            return Err(RuleError::new(pos, format!("unexpected character {c:?}")));
        };
        out.push(Lexed { token, pos });
    }
}

struct Lexer {
    chars: Vec<char>,
    at: usize,
    line: u32,
    column: u32,
}

impl Lexer {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.column,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.at + ahead).copied()
    }

    fn starts_with(&self, s: &str) -> bool {
        s.chars()
            .enumerate()
            .all(|(i, c)| self.peek_at(i) == Some(c))
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += 1;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek().filter(|c| keep(*c)) {
            s.push(c);
            self.bump();
        }
        s
    }

    fn skip_space_and_comments(&mut self) {
        loop {
            match self.peek() {
                Some(c) if c.is_whitespace() => {
                    self.bump();
                }
                Some('#') => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                _ => return,
            }
        }
    }

    /// A number, a duration (`90d`) or an ordinal (`5th`).
    fn number(&mut self, pos: Pos) -> Result<Token, RuleError> {
        let mut text = self.take_while(|c| c.is_ascii_digit());
        let integral = text.clone();
        let mut is_integer = true;
        if self.peek() == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            is_integer = false;
            self.bump();
            text.push('.');
            text.push_str(&self.take_while(|c| c.is_ascii_digit()));
        }
        if matches!(self.peek(), Some('e' | 'E'))
            && (self.peek_at(1).is_some_and(|c| c.is_ascii_digit())
                || (matches!(self.peek_at(1), Some('+' | '-'))
                    && self.peek_at(2).is_some_and(|c| c.is_ascii_digit())))
        {
            is_integer = false;
            text.push('e');
            self.bump();
            if let Some(sign @ ('+' | '-')) = self.peek() {
                text.push(sign);
                self.bump();
            }
            text.push_str(&self.take_while(|c| c.is_ascii_digit()));
        }
        let suffix = self.take_while(|c| c.is_ascii_alphanumeric() || c == '_');
        if suffix.is_empty() {
            return match text.parse::<f64>() {
                Ok(n) if n.is_finite() => Ok(Token::Number(n)),
                _ => Err(RuleError::new(
                    pos,
                    format!("number {text} is out of range"),
                )),
            };
        }
        if !is_integer {
            return Err(RuleError::new(
                pos,
                format!(
                    "expected a whole number before '{suffix}' (durations and ordinals are integers)"
                ),
            ));
        }
        let amount: i64 = integral
            .parse()
            .map_err(|_| RuleError::new(pos, format!("number {integral} is out of range")))?;
        match suffix.as_str() {
            "st" | "nd" | "rd" | "th" => {
                let n = u32::try_from(amount).map_err(|_| {
                    RuleError::new(pos, format!("ordinal {integral}{suffix} is out of range"))
                })?;
                Ok(Token::Ordinal(n))
            }
            unit => match Span::from_unit(amount, unit) {
                Some(span) => Ok(Token::Duration(span)),
                None if ["s", "m", "h", "d", "w"].contains(&unit) => Err(RuleError::new(
                    pos,
                    format!("duration {integral}{unit} is out of range"),
                )),
                None => Err(RuleError::new(
                    pos,
                    format!(
                        "unknown unit '{unit}' after {integral}: expected a duration unit (s, m, h, d, w) or an ordinal (1st, 2nd, 5th)"
                    ),
                )),
            },
        }
    }

    /// Text between `quote`s. Strings take backslash escapes; backtick names double
    /// a backtick to include one.
    fn delimited(&mut self, quote: char, pos: Pos) -> Result<String, RuleError> {
        self.bump();
        let mut s = String::new();
        loop {
            let here = self.pos();
            match self.bump() {
                None => {
                    let what = if quote == '"' {
                        "string"
                    } else {
                        "quoted name"
                    };
                    return Err(RuleError::new(
                        pos,
                        format!("unterminated {what}: expected a closing {quote}"),
                    ));
                }
                Some(c) if c == quote => {
                    if quote == '`' && self.peek() == Some('`') {
                        self.bump();
                        s.push('`');
                    } else {
                        return Ok(s);
                    }
                }
                Some('\\') if quote == '"' => s.push(self.escape(here)?),
                Some(c) => s.push(c),
            }
        }
    }

    fn escape(&mut self, pos: Pos) -> Result<char, RuleError> {
        let bad = |what: String| RuleError::new(pos, what);
        match self.bump() {
            Some('"') => Ok('"'),
            Some('\\') => Ok('\\'),
            Some('n') => Ok('\n'),
            Some('t') => Ok('\t'),
            Some('r') => Ok('\r'),
            Some('u') => {
                if self.bump() != Some('{') {
                    return Err(bad("expected '{' after \\u, as in \\u{e9}".into()));
                }
                let hex = self.take_while(|c| c.is_ascii_hexdigit());
                if self.bump() != Some('}') || hex.is_empty() || hex.len() > 6 {
                    return Err(bad("expected 1 to 6 hex digits and '}' in \\u{...}".into()));
                }
                u32::from_str_radix(&hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| bad(format!("\\u{{{hex}}} is not a character")))
            }
            Some(c) => Err(bad(format!(
                "unknown escape \\{c}: expected one of \\\" \\\\ \\n \\t \\r \\u{{...}}"
            ))),
            None => Err(bad("unterminated string: expected a closing \"".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Vec<Token> {
        lex(text).unwrap().into_iter().map(|l| l.token).collect()
    }

    #[test]
    fn durations_ordinals_and_numbers() {
        assert_eq!(
            tokens("90d 5th 2.5 1e3 7"),
            vec![
                Token::Duration(Span::days(90)),
                Token::Ordinal(5),
                Token::Number(2.5),
                Token::Number(1000.0),
                Token::Number(7.0),
                Token::Eof
            ]
        );
    }

    #[test]
    fn positions_are_line_and_column() {
        let lexed = lex("a and\n  b").unwrap();
        let pos: Vec<_> = lexed.iter().map(|l| (l.pos.line, l.pos.column)).collect();
        assert_eq!(pos, vec![(1, 1), (1, 3), (2, 3), (2, 4)]);
    }

    #[test]
    fn strings_and_quoted_names_escape() {
        assert_eq!(
            tokens(r#""a\"b\u{e9}" `odd``name`"#),
            vec![
                Token::Str("a\"bé".into()),
                Token::Quoted("odd`name".into()),
                Token::Eof
            ]
        );
    }

    #[test]
    fn comments_are_skipped() {
        assert_eq!(tokens("a # note\n== 1"), tokens("a == 1"));
    }

    #[test]
    fn errors_name_the_position_and_what_was_expected() {
        let err = lex("x = 1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "1:3: unexpected '=': expected '==' to compare"
        );
        let err = lex("count(a) in last 5y").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("1:18: unknown unit 'y' after 5"),
            "{err}"
        );
        let err = lex("\"open").unwrap_err();
        assert_eq!(
            err.to_string(),
            "1:1: unterminated string: expected a closing \""
        );
        let err = lex("1.5d").unwrap_err();
        assert!(
            err.to_string().starts_with("1:1: expected a whole number"),
            "{err}"
        );
        let err = lex("@2026-13-01").unwrap_err();
        assert!(
            err.to_string().starts_with("1:1: expected a timestamp"),
            "{err}"
        );
    }
}

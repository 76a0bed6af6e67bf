//! Recursive-descent parser for the rule language (grammar in docs/rules.md).
//!
//! Precedence, loosest first: `or`, `and`, `not`, then predicates (comparisons,
//! `in`, `contains`, `starts_with`, `is null`, `exists`), then `+`/`-` of a
//! duration. Recursion depth is bounded by [`Limits::max_depth`] so that no input
//! can overflow the stack.

use std::sync::Arc;

use super::ast::{
    AggFunc, Aggregate, CmpOp, EventSelector, Expr, ExprKind, Operand, OperandKind, Pos, Rule,
    Window,
};
use super::lexer::{Lexed, Token, lex};
use crate::error::{RuleError, RuleErrorKind};
use crate::event::{EventName, SegmentId};
use crate::limits::Limits;
use crate::time::Span;
use crate::value::Value;

/// Words with a meaning of their own; a trait or property with one of these names
/// is written in backticks.
const RESERVED: [&str; 15] = [
    "and",
    "or",
    "not",
    "in",
    "is",
    "null",
    "true",
    "false",
    "now",
    "where",
    "since",
    "between",
    "contains",
    "starts_with",
    "exists",
];

/// True when `word` is reserved and must be backticked to be used as a name.
pub fn is_reserved(word: &str) -> bool {
    RESERVED.contains(&word)
}

/// Parses one rule.
pub fn parse_rule(text: &str, limits: &Limits) -> Result<Rule, RuleError> {
    if text.len() > limits.max_rule_bytes {
        return Err(RuleError::of(
            RuleErrorKind::Limit,
            Pos { line: 1, column: 1 },
            format!(
                "rule is {} bytes, over the limit of {}",
                text.len(),
                limits.max_rule_bytes
            ),
        ));
    }
    let tokens = lex(text)?;
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
        limits,
        in_filter: false,
    };
    let expr = parser.or_expr()?;
    match parser.peek() {
        Token::Eof => Ok(Rule {
            text: text.into(),
            expr,
        }),
        Token::Sym(")") => Err(parser.error("unmatched ')': no '(' is open here")),
        _ => Err(parser.error_expected("'and', 'or' or the end of the rule")),
    }
}

struct Parser<'a> {
    tokens: Vec<Lexed>,
    at: usize,
    depth: usize,
    limits: &'a Limits,
    /// Inside `where`: bare names are event properties, and aggregates, segment
    /// references and `now` are not allowed (a filter must not depend on time).
    in_filter: bool,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        &self.tokens[self.at.min(self.tokens.len() - 1)].token
    }

    fn peek_at(&self, ahead: usize) -> &Token {
        &self.tokens[(self.at + ahead).min(self.tokens.len() - 1)].token
    }

    fn pos(&self) -> Pos {
        self.tokens[self.at.min(self.tokens.len() - 1)].pos
    }

    fn bump(&mut self) -> Token {
        let token = self.peek().clone();
        if self.at < self.tokens.len() - 1 {
            self.at += 1;
        }
        token
    }

    fn error(&self, message: impl Into<String>) -> RuleError {
        RuleError::new(self.pos(), message)
    }

    fn error_expected(&self, what: &str) -> RuleError {
        self.error(format!("expected {what}, found {}", self.peek()))
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Token::Ident(w) if w == word)
    }

    fn eat_word(&mut self, word: &str) -> bool {
        let found = self.is_word(word);
        if found {
            self.bump();
        }
        found
    }

    fn is_sym(&self, sym: &str) -> bool {
        matches!(self.peek(), Token::Sym(s) if *s == sym)
    }

    fn expect_sym(&mut self, sym: &str, context: &str) -> Result<(), RuleError> {
        if self.is_sym(sym) {
            self.bump();
            Ok(())
        } else {
            Err(self.error_expected(&format!("'{sym}' {context}")))
        }
    }

    fn enter(&mut self) -> Result<(), RuleError> {
        self.depth += 1;
        if self.depth > self.limits.max_depth {
            return Err(RuleError::of(
                RuleErrorKind::Limit,
                self.pos(),
                format!(
                    "rule nests deeper than the limit of {} levels",
                    self.limits.max_depth
                ),
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn or_expr(&mut self) -> Result<Expr, RuleError> {
        self.enter()?;
        let mut lhs = self.and_expr()?;
        while self.eat_word("or") {
            let rhs = self.and_expr()?;
            let pos = lhs.pos;
            lhs = Expr {
                kind: ExprKind::Or(Box::new(lhs), Box::new(rhs)),
                pos,
            };
        }
        self.leave();
        Ok(lhs)
    }

    fn and_expr(&mut self) -> Result<Expr, RuleError> {
        let mut lhs = self.not_expr()?;
        while self.eat_word("and") {
            let rhs = self.not_expr()?;
            let pos = lhs.pos;
            lhs = Expr {
                kind: ExprKind::And(Box::new(lhs), Box::new(rhs)),
                pos,
            };
        }
        Ok(lhs)
    }

    fn not_expr(&mut self) -> Result<Expr, RuleError> {
        if self.is_word("not") {
            let pos = self.pos();
            self.bump();
            self.enter()?;
            let inner = self.not_expr()?;
            self.leave();
            return Ok(Expr {
                kind: ExprKind::Not(Box::new(inner)),
                pos,
            });
        }
        self.predicate()
    }

    /// A predicate, or a parenthesised boolean expression. A parenthesised operand,
    /// as in `(now - 1d) < last_seen(x)`, is recognised by what follows the `)`.
    fn predicate(&mut self) -> Result<Expr, RuleError> {
        let pos = self.pos();
        let lhs = if self.is_sym("(") {
            let open = self.pos();
            self.bump();
            let inner = self.or_expr()?;
            if !self.is_sym(")") {
                return Err(self.error_expected(&format!("')' to close the '(' at {open}")));
            }
            self.bump();
            match inner.kind {
                ExprKind::Truthy(operand) if self.continues_operand() => {
                    self.operand_suffix(Operand {
                        kind: operand.kind,
                        pos,
                    })?
                }
                kind => return Ok(Expr { kind, pos }),
            }
        } else {
            self.operand()?
        };
        self.predicate_tail(lhs, pos)
    }

    /// True when the next token continues a value (so a parenthesised value was an
    /// operand, not a boolean group).
    fn continues_operand(&self) -> bool {
        matches!(
            self.peek(),
            Token::Sym("+" | "-" | "==" | "!=" | "<" | "<=" | ">" | ">=")
        ) || ["in", "is", "contains", "starts_with", "exists"]
            .iter()
            .any(|w| self.is_word(w))
    }

    fn predicate_tail(&mut self, lhs: Operand, pos: Pos) -> Result<Expr, RuleError> {
        let kind = if let Some(op) = self.cmp_op() {
            self.bump();
            let rhs = self.operand()?;
            if self.cmp_op().is_some() {
                return Err(self.error("comparisons do not chain: join them with 'and'"));
            }
            ExprKind::Compare(op, lhs, rhs)
        } else if self.is_word("in") {
            self.bump();
            let list = self.list_literal()?;
            ExprKind::In(lhs, list)
        } else if self.eat_word("contains") {
            ExprKind::Contains(lhs, self.operand()?)
        } else if self.eat_word("starts_with") {
            ExprKind::StartsWith(lhs, self.operand()?)
        } else if self.eat_word("is") {
            let negated = self.eat_word("not");
            if !self.eat_word("null") {
                return Err(self.error_expected(if negated {
                    "'null' after 'is not'"
                } else {
                    "'null' or 'not null' after 'is'"
                }));
            }
            ExprKind::IsNull {
                operand: lhs,
                negated,
            }
        } else if self.eat_word("exists") {
            ExprKind::IsNull {
                operand: lhs,
                negated: true,
            }
        } else {
            ExprKind::Truthy(lhs)
        };
        Ok(Expr { kind, pos })
    }

    fn cmp_op(&self) -> Option<CmpOp> {
        match self.peek() {
            Token::Sym("==") => Some(CmpOp::Eq),
            Token::Sym("!=") => Some(CmpOp::Ne),
            Token::Sym("<") => Some(CmpOp::Lt),
            Token::Sym("<=") => Some(CmpOp::Le),
            Token::Sym(">") => Some(CmpOp::Gt),
            Token::Sym(">=") => Some(CmpOp::Ge),
            _ => None,
        }
    }

    /// A value, with any `+ D` / `- D` shifts.
    fn operand(&mut self) -> Result<Operand, RuleError> {
        let primary = if self.is_sym("(") {
            let open = self.pos();
            self.bump();
            self.enter()?;
            let inner = self.operand()?;
            self.leave();
            if !self.is_sym(")") {
                return Err(self.error_expected(&format!("')' to close the '(' at {open}")));
            }
            self.bump();
            Operand {
                kind: inner.kind,
                pos: open,
            }
        } else {
            self.primary()?
        };
        self.operand_suffix(primary)
    }

    fn operand_suffix(&mut self, mut operand: Operand) -> Result<Operand, RuleError> {
        while let Token::Sym(sign @ ("+" | "-")) = self.peek() {
            let negative = *sign == "-";
            self.bump();
            let span = match self.bump() {
                Token::Duration(span) => span,
                Token::Number(n) => {
                    self.at -= 1;
                    return Err(self.error(format!(
                        "expected a duration like {n}d after '{}': only durations add to or subtract from timestamps",
                        if negative { '-' } else { '+' }
                    )));
                }
                _ => {
                    self.at -= 1;
                    return Err(self.error_expected("a duration like 7d"));
                }
            };
            let span = if negative { Span(-span.millis()) } else { span };
            let pos = operand.pos;
            operand = Operand {
                kind: OperandKind::Shift(Box::new(operand), span),
                pos,
            };
        }
        Ok(operand)
    }

    fn primary(&mut self) -> Result<Operand, RuleError> {
        let pos = self.pos();
        let kind = match self.peek().clone() {
            Token::Number(_) | Token::Str(_) | Token::Time(_) => {
                OperandKind::Literal(self.scalar_literal()?)
            }
            Token::Sym("-") if matches!(self.peek_at(1), Token::Number(_)) => {
                OperandKind::Literal(self.scalar_literal()?)
            }
            Token::Sym("[") => {
                return Err(self.error("a list can only follow 'in', as in plan in [\"a\", \"b\"]"));
            }
            Token::Quoted(name) => {
                self.bump();
                self.name_operand(name.into())
            }
            Token::Ident(word) => match word.as_str() {
                "true" | "false" | "null" => OperandKind::Literal(self.scalar_literal()?),
                "now" => {
                    if self.in_filter {
                        return Err(self.error(
                            "'now' cannot appear in a where filter: a filter must not depend on time",
                        ));
                    }
                    self.bump();
                    OperandKind::Now
                }
                _ if matches!(self.peek_at(1), Token::Sym("(")) => self.call(&word)?,
                _ if is_reserved(&word) => {
                    return Err(
                        self.error_expected("a value (a trait, a literal, now or an aggregate)")
                    );
                }
                _ => {
                    self.bump();
                    self.name_operand(word.into())
                }
            },
            Token::Duration(span) => {
                return Err(self.error(format!(
                    "a duration ({span}) is not a value: write now - {span} for a time, or put it after 'in last'"
                )));
            }
            _ => {
                return Err(
                    self.error_expected("a value (a trait, a literal, now or an aggregate)")
                );
            }
        };
        Ok(Operand { kind, pos })
    }

    fn name_operand(&self, name: Arc<str>) -> OperandKind {
        if self.in_filter {
            OperandKind::Property(name)
        } else {
            OperandKind::Trait(name)
        }
    }

    fn scalar_literal(&mut self) -> Result<Value, RuleError> {
        let negative = self.is_sym("-");
        if negative {
            self.bump();
        }
        let value = match self.bump() {
            Token::Number(n) => Value::Number(if negative { -n } else { n }),
            _ if negative => {
                self.at -= 1;
                return Err(self.error_expected("a number after '-'"));
            }
            Token::Str(s) => Value::String(s.into()),
            Token::Time(t) => Value::Timestamp(t),
            Token::Ident(w) if w == "true" => Value::Bool(true),
            Token::Ident(w) if w == "false" => Value::Bool(false),
            Token::Ident(w) if w == "null" => Value::Null,
            Token::Sym("[") => {
                self.at -= 1;
                self.enter()?;
                let list = self.list_literal()?;
                self.leave();
                Value::List(list.into())
            }
            _ => {
                self.at -= 1;
                return Err(self
                    .error_expected("a literal (number, string, @timestamp, true, false, null)"));
            }
        };
        Ok(value)
    }

    fn list_literal(&mut self) -> Result<Vec<Value>, RuleError> {
        let open = self.pos();
        if !self.is_sym("[") {
            return Err(self.error_expected("'[' to start a list after 'in', as in [\"a\", \"b\"]"));
        }
        self.bump();
        let mut items = Vec::new();
        if self.is_sym("]") {
            self.bump();
            return Ok(items);
        }
        loop {
            if items.len() >= self.limits.max_list_len {
                return Err(RuleError::of(
                    RuleErrorKind::Limit,
                    self.pos(),
                    format!(
                        "list has more than the limit of {} items",
                        self.limits.max_list_len
                    ),
                ));
            }
            items.push(self.scalar_literal()?);
            if self.is_sym(",") {
                self.bump();
            } else if self.is_sym("]") {
                self.bump();
                return Ok(items);
            } else {
                return Err(self.error_expected(&format!("',' or ']' to close the list at {open}")));
            }
        }
    }

    /// `name(` ... `)`: an aggregate or `in_segment`.
    fn call(&mut self, name: &str) -> Result<OperandKind, RuleError> {
        let pos = self.pos();
        if name == "in_segment" {
            if self.in_filter {
                return Err(self.error("in_segment cannot appear in a where filter"));
            }
            self.bump();
            self.bump();
            let id = match self.bump() {
                Token::Str(id) => id,
                _ => {
                    self.at -= 1;
                    return Err(
                        self.error_expected("a segment id in quotes, as in in_segment(\"vip\")")
                    );
                }
            };
            self.expect_sym(")", "to close in_segment(")?;
            return Ok(OperandKind::InSegment(SegmentId::new(id)));
        }
        let Some(func) = AggFunc::from_name(name) else {
            let known: Vec<_> = AggFunc::ALL.iter().map(|f| f.name()).collect();
            return Err(RuleError::of(
                RuleErrorKind::UnknownFunction,
                pos,
                format!(
                    "unknown function '{name}': expected one of {}, in_segment",
                    known.join(", ")
                ),
            ));
        };
        if self.in_filter {
            return Err(self.error(format!(
                "{name}(...) cannot appear in a where filter: a filter tests one event's properties"
            )));
        }
        self.bump();
        self.bump();
        let name_pos = self.pos();
        let event = self.event_name("an event name")?;
        let property = if self.is_sym(".") {
            self.bump();
            Some(self.property_name()?)
        } else {
            None
        };
        let filter = self.filter()?;
        self.expect_sym(")", &format!("to close {name}("))?;
        let window = self.window()?;
        let events = EventSelector {
            name: event,
            name_pos,
            filter,
        };
        Ok(OperandKind::Aggregate(Box::new(Aggregate {
            func,
            events,
            property,
            window,
        })))
    }

    fn event_name(&mut self, what: &str) -> Result<EventName, RuleError> {
        match self.bump() {
            Token::Ident(name) if !is_reserved(&name) => Ok(EventName::new(name)),
            Token::Quoted(name) | Token::Str(name) if !name.is_empty() => Ok(EventName::new(name)),
            _ => {
                self.at -= 1;
                Err(self.error_expected(what))
            }
        }
    }

    fn property_name(&mut self) -> Result<Arc<str>, RuleError> {
        match self.bump() {
            Token::Ident(name) if !is_reserved(&name) => Ok(name.into()),
            Token::Quoted(name) | Token::Str(name) if !name.is_empty() => Ok(name.into()),
            _ => {
                self.at -= 1;
                Err(self.error_expected("a property name after '.'"))
            }
        }
    }

    fn filter(&mut self) -> Result<Option<Box<Expr>>, RuleError> {
        if !self.eat_word("where") {
            return Ok(None);
        }
        self.in_filter = true;
        let filter = self.or_expr();
        self.in_filter = false;
        Ok(Some(Box::new(filter?)))
    }

    fn window(&mut self) -> Result<Window, RuleError> {
        if self.is_word("in")
            && matches!(self.peek_at(1), Token::Ident(w) if w == "last" || w == "lifetime")
        {
            self.bump();
            if self.eat_word("lifetime") {
                return Ok(Window::Lifetime);
            }
            self.bump();
            return self.positive_duration("after 'in last'").map(Window::Last);
        }
        if self.eat_word("between") {
            let start_pos = self.pos();
            let start = self.time_literal("after 'between'")?;
            if !self.eat_word("and") {
                return Err(self.error_expected("'and' between the two timestamps of 'between'"));
            }
            let end = self.time_literal("after 'and'")?;
            if end < start {
                return Err(RuleError::of(
                    RuleErrorKind::Window,
                    start_pos,
                    format!(
                        "window between @{start} and @{end} is empty: the end is before the start"
                    ),
                ));
            }
            return Ok(Window::Between(start, end));
        }
        if self.eat_word("since") {
            self.eat_word("the");
            let nth_pos = self.pos();
            let nth = match self.peek() {
                Token::Ordinal(n) => {
                    let n = *n;
                    self.bump();
                    n
                }
                _ => 1,
            };
            if nth == 0 {
                return Err(RuleError::of(
                    RuleErrorKind::Window,
                    nth_pos,
                    "the 0th most recent event does not exist: count from 1st",
                ));
            }
            if nth > self.limits.max_anchor_nth {
                return Err(RuleError::of(
                    RuleErrorKind::Limit,
                    nth_pos,
                    format!(
                        "since the {nth}th most recent is over the limit of {}",
                        self.limits.max_anchor_nth
                    ),
                ));
            }
            if !(self.eat_word("most") && self.eat_word("recent")) {
                return Err(self.error_expected(
                    "'most recent', as in since the 5th most recent campaign_sent",
                ));
            }
            let anchor = if self.is_sym("(") {
                let open = self.pos();
                self.bump();
                let name_pos = self.pos();
                let name = self.event_name("an event name")?;
                let filter = self.filter()?;
                if !self.is_sym(")") {
                    return Err(self.error_expected(&format!("')' to close the '(' at {open}")));
                }
                self.bump();
                EventSelector {
                    name,
                    name_pos,
                    filter,
                }
            } else {
                let name_pos = self.pos();
                let name = self.event_name("an event name after 'most recent'")?;
                EventSelector {
                    name,
                    name_pos,
                    filter: None,
                }
            };
            return Ok(Window::Since { nth, anchor });
        }
        Ok(Window::Lifetime)
    }

    fn positive_duration(&mut self, context: &str) -> Result<Span, RuleError> {
        let pos = self.pos();
        match self.bump() {
            Token::Duration(span) if span.millis() > 0 => Ok(span),
            Token::Duration(span) => Err(RuleError::of(
                RuleErrorKind::Window,
                pos,
                format!(
                    "window must be longer than zero, found {}",
                    format_zero(span)
                ),
            )),
            Token::Sym("-") if matches!(self.peek(), Token::Duration(_)) => {
                let span = match self.peek() {
                    Token::Duration(s) => *s,
                    _ => Span::ZERO,
                };
                Err(RuleError::of(
                    RuleErrorKind::Window,
                    pos,
                    format!("window must be longer than zero, found -{span}"),
                ))
            }
            _ => {
                self.at -= 1;
                Err(self.error_expected(&format!("a duration like 7d {context}")))
            }
        }
    }

    fn time_literal(&mut self, context: &str) -> Result<crate::time::Timestamp, RuleError> {
        match self.bump() {
            Token::Time(t) => Ok(t),
            _ => {
                self.at -= 1;
                Err(self.error_expected(&format!("a timestamp like @2026-01-31 {context}")))
            }
        }
    }
}

fn format_zero(span: Span) -> String {
    if span.millis() == 0 {
        "0".into()
    } else {
        span.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Rule {
        parse_rule(text, &Limits::default()).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn error(text: &str) -> String {
        match parse_rule(text, &Limits::default()) {
            Ok(rule) => panic!("{text} parsed as {}", rule.expr),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn prints_back_in_canonical_form() {
        for (text, printed) in [
            (
                "count(order_completed) in last 90d >= 2",
                "count(order_completed) in last 90d >= 2",
            ),
            (
                "a == 1 and (b == 2 or c == 3)",
                "a == 1 and (b == 2 or c == 3)",
            ),
            (
                "(a == 1 and b == 2) or c == 3",
                "a == 1 and b == 2 or c == 3",
            ),
            ("not not x", "not not x"),
            ("not (x > 3)", "not x > 3"),
            (
                "last_seen(order_completed) < now - 180d",
                "last_seen(order_completed) < now - 180d",
            ),
            ("(now - 1d) < last_seen(a)", "now - 1d < last_seen(a)"),
            (
                "plan in [\"a\", 1, -2.5, true, null]",
                "plan in [\"a\", 1, -2.5, true, null]",
            ),
            ("plan exists", "plan is not null"),
            ("`odd name` is null", "`odd name` is null"),
            (
                "count(\"Order Completed\" where category == \"shoes\") in last 7d >= 3",
                "count(`Order Completed` where category == \"shoes\") in last 7d >= 3",
            ),
            (
                "not exists(email_opened) since the 5th most recent campaign_sent",
                "not exists(email_opened) since the 5th most recent campaign_sent",
            ),
            (
                "exists(a) since most recent (b where x == 1)",
                "exists(a) since the 1st most recent (b where x == 1)",
            ),
            (
                "sum(order_completed.revenue) between @2026-01-01 and @2026-02-01T12:00:00Z > 5",
                "sum(order_completed.revenue) between @2026-01-01T00:00:00Z and @2026-02-01T12:00:00Z > 5",
            ),
            ("in_segment(\"vip\")", "in_segment(\"vip\")"),
            ("count(a) in lifetime > 1", "count(a) > 1"),
            ("signup + 1d - 2h > now", "signup + 1d - 2h > now"),
        ] {
            let rule = parse(text);
            assert_eq!(rule.expr.to_string(), printed, "{text}");
            // Printing is a fixed point: the printed text parses and prints the same.
            assert_eq!(parse(printed).expr.to_string(), printed);
        }
    }

    #[test]
    fn and_binds_tighter_than_or_and_not_tighter_than_and() {
        let rule = parse("a or b and not c");
        let ExprKind::Or(_, rhs) = &rule.expr.kind else {
            panic!("{:?}", rule.expr)
        };
        let ExprKind::And(_, not) = &rhs.kind else {
            panic!("{rhs:?}")
        };
        assert!(matches!(not.kind, ExprKind::Not(_)));
    }

    #[test]
    fn names_inside_filters_are_properties() {
        let rule = parse("count(e where category == \"x\") > 0 and category == \"y\"");
        let ExprKind::And(lhs, rhs) = &rule.expr.kind else {
            panic!()
        };
        let ExprKind::Compare(_, agg, _) = &lhs.kind else {
            panic!()
        };
        let OperandKind::Aggregate(agg) = &agg.kind else {
            panic!()
        };
        let filter = agg.events.filter.as_ref().unwrap();
        let ExprKind::Compare(_, prop, _) = &filter.kind else {
            panic!()
        };
        assert!(matches!(prop.kind, OperandKind::Property(_)));
        let ExprKind::Compare(_, t, _) = &rhs.kind else {
            panic!()
        };
        assert!(matches!(t.kind, OperandKind::Trait(_)));
    }

    #[test]
    fn syntax_errors_say_where_and_what_was_expected() {
        assert_eq!(
            error("count(a) >"),
            "1:11: expected a value (a trait, a literal, now or an aggregate), found end of rule"
        );
        assert_eq!(
            error("(a == 1"),
            "1:8: expected ')' to close the '(' at 1:1, found end of rule"
        );
        assert_eq!(
            error("a == 1 b"),
            "1:8: expected 'and', 'or' or the end of the rule, found 'b'"
        );
        assert_eq!(error("a == 1)"), "1:7: unmatched ')': no '(' is open here");
        assert_eq!(
            error("count(a in last 7d)"),
            "1:9: expected ')' to close count(, found 'in'"
        );
        assert_eq!(
            error("a < b < c"),
            "1:7: comparisons do not chain: join them with 'and'"
        );
        assert_eq!(
            error("plan in \"a\""),
            "1:9: expected '[' to start a list after 'in', as in [\"a\", \"b\"], found string \"a\""
        );
        assert_eq!(
            error("x is"),
            "1:5: expected 'null' or 'not null' after 'is', found end of rule"
        );
        assert_eq!(
            error("now - 5 > x"),
            "1:7: expected a duration like 5d after '-': only durations add to or subtract from timestamps"
        );
        assert_eq!(
            error("count(a where now > x) > 1"),
            "1:15: 'now' cannot appear in a where filter: a filter must not depend on time"
        );
        assert_eq!(
            error("count(a where count(b) > 1) > 1"),
            "1:15: count(...) cannot appear in a where filter: a filter tests one event's properties"
        );
        assert_eq!(
            error("count(a) since the 5th campaign"),
            "1:24: expected 'most recent', as in since the 5th most recent campaign_sent, found 'campaign'"
        );
        assert_eq!(
            error("count(a) between @2026-01-01 @2026-02-01 > 1"),
            "1:30: expected 'and' between the two timestamps of 'between', found timestamp @2026-02-01T00:00:00Z"
        );
        assert_eq!(
            error("in_segment(vip)"),
            "1:12: expected a segment id in quotes, as in in_segment(\"vip\"), found 'vip'"
        );
        assert_eq!(
            error("and"),
            "1:1: expected a value (a trait, a literal, now or an aggregate), found 'and'"
        );
        assert_eq!(
            error("x > 7d"),
            "1:5: a duration (7d) is not a value: write now - 7d for a time, or put it after 'in last'"
        );
    }

    #[test]
    fn window_errors_are_window_kind() {
        for (text, message) in [
            (
                "count(a) in last 0d > 1",
                "1:18: window must be longer than zero, found 0",
            ),
            (
                "count(a) in last -5d > 1",
                "1:18: window must be longer than zero, found -5d",
            ),
            (
                "count(a) since the 0th most recent b > 1",
                "1:20: the 0th most recent event does not exist: count from 1st",
            ),
            (
                "count(a) between @2026-02-01 and @2026-01-01 > 1",
                "1:18: window between @2026-02-01T00:00:00Z and @2026-01-01T00:00:00Z is empty: the end is before the start",
            ),
        ] {
            let err = parse_rule(text, &Limits::default()).unwrap_err();
            assert_eq!(err.kind, RuleErrorKind::Window, "{text}");
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn unknown_functions_list_the_known_ones() {
        let err = parse_rule("cnt(a) > 1", &Limits::default()).unwrap_err();
        assert_eq!(err.kind, RuleErrorKind::UnknownFunction);
        assert_eq!(
            err.to_string(),
            "1:1: unknown function 'cnt': expected one of count, sum, avg, min, max, distinct, first_seen, last_seen, exists, in_segment"
        );
    }

    #[test]
    fn deep_nesting_is_a_limit_error_not_a_stack_overflow() {
        let deep = format!("{}a{}", "(".repeat(100_000), ")".repeat(100_000));
        let limits = Limits {
            max_rule_bytes: 1 << 20,
            ..Limits::default()
        };
        let err = parse_rule(&deep, &limits).unwrap_err();
        assert_eq!(err.kind, RuleErrorKind::Limit);
        let nots = format!("{}a", "not ".repeat(100_000));
        let err = parse_rule(&nots, &limits).unwrap_err();
        assert_eq!(err.kind, RuleErrorKind::Limit);
        assert!(err.message.contains("nests deeper"), "{err}");
    }

    #[test]
    fn oversized_rules_and_lists_are_limit_errors() {
        let limits = Limits {
            max_rule_bytes: 10,
            ..Limits::default()
        };
        let err = parse_rule("count(order_completed) > 1", &limits).unwrap_err();
        assert_eq!(
            (err.kind, err.to_string()),
            (
                RuleErrorKind::Limit,
                "1:1: rule is 26 bytes, over the limit of 10".into()
            )
        );
        let limits = Limits {
            max_list_len: 2,
            ..Limits::default()
        };
        let err = parse_rule("a in [1,2,3]", &limits).unwrap_err();
        assert_eq!(
            (err.kind, err.to_string()),
            (
                RuleErrorKind::Limit,
                "1:11: list has more than the limit of 2 items".into()
            )
        );
    }
}

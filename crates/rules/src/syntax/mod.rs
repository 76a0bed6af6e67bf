//! The rule language's text: tokens, syntax tree, parser and printer.

mod ast;
mod lexer;
mod parser;

pub use ast::{
    AggFunc, Aggregate, CmpOp, EventSelector, Expr, ExprKind, Operand, OperandKind, Pos, Rule,
    Window, ordinal_suffix,
};
pub use lexer::is_plain_identifier;
pub use parser::{is_reserved, parse_rule};

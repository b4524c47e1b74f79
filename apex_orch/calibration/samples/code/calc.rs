//! A small expression calculator: tokenizer, recursive-descent parser, evaluator.
//!
//! Grammar (lowest to highest precedence):
//!   expr   := term (('+' | '-') term)*
//!   term   := factor (('*' | '/' | '%') factor)*
//!   factor := unary ('^' factor)?          // right-associative power
//!   unary  := '-' unary | call
//!   call   := IDENT '(' expr ')' | primary
//!   primary:= NUMBER | IDENT | '(' expr ')'

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, Write};

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Num(f64),
    Ident(String),
    Op(char),
    LParen,
    RParen,
    Assign,
}

#[derive(Debug)]
pub enum CalcError {
    UnexpectedChar(char, usize),
    UnexpectedEnd,
    UnexpectedToken(String),
    UnknownVariable(String),
    UnknownFunction(String),
    DivisionByZero,
}

impl fmt::Display for CalcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalcError::UnexpectedChar(c, pos) => write!(f, "unexpected character '{}' at {}", c, pos),
            CalcError::UnexpectedEnd => write!(f, "unexpected end of input"),
            CalcError::UnexpectedToken(t) => write!(f, "unexpected token {}", t),
            CalcError::UnknownVariable(name) => write!(f, "unknown variable '{}'", name),
            CalcError::UnknownFunction(name) => write!(f, "unknown function '{}'", name),
            CalcError::DivisionByZero => write!(f, "division by zero"),
        }
    }
}

fn tokenize(input: &str) -> Result<Vec<Token>, CalcError> {
    let chars: Vec<char> = input.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' => i += 1,
            '0'..='9' | '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                let value = text.parse::<f64>().map_err(|_| CalcError::UnexpectedChar(c, start))?;
                tokens.push(Token::Num(value));
            }
            'a'..='z' | 'A'..='Z' | '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                tokens.push(Token::Ident(chars[start..i].iter().collect()));
            }
            '+' | '-' | '*' | '/' | '%' | '^' => {
                tokens.push(Token::Op(c));
                i += 1;
            }
            '(' => { tokens.push(Token::LParen); i += 1; }
            ')' => { tokens.push(Token::RParen); i += 1; }
            '=' => { tokens.push(Token::Assign); i += 1; }
            _ => return Err(CalcError::UnexpectedChar(c, i)),
        }
    }
    Ok(tokens)
}

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
    vars: &'a HashMap<String, f64>,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn expr(&mut self) -> Result<f64, CalcError> {
        let mut value = self.term()?;
        while let Some(Token::Op(op @ ('+' | '-'))) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.term()?;
            value = if op == '+' { value + rhs } else { value - rhs };
        }
        Ok(value)
    }

    fn term(&mut self) -> Result<f64, CalcError> {
        let mut value = self.factor()?;
        while let Some(Token::Op(op @ ('*' | '/' | '%'))) = self.peek().cloned() {
            self.pos += 1;
            let rhs = self.factor()?;
            value = match op {
                '*' => value * rhs,
                _ if rhs == 0.0 => return Err(CalcError::DivisionByZero),
                '/' => value / rhs,
                _ => value % rhs,
            };
        }
        Ok(value)
    }

    fn factor(&mut self) -> Result<f64, CalcError> {
        let base = self.unary()?;
        if let Some(Token::Op('^')) = self.peek() {
            self.pos += 1;
            let exponent = self.factor()?; // right-associative: 2^3^2 = 2^9
            return Ok(base.powf(exponent));
        }
        Ok(base)
    }

    fn unary(&mut self) -> Result<f64, CalcError> {
        if let Some(Token::Op('-')) = self.peek() {
            self.pos += 1;
            return Ok(-self.unary()?);
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<f64, CalcError> {
        match self.next() {
            Some(Token::Num(n)) => Ok(n),
            Some(Token::Ident(name)) => {
                if let Some(Token::LParen) = self.peek() {
                    self.pos += 1;
                    let arg = self.expr()?;
                    self.expect_rparen()?;
                    apply(&name, arg)
                } else {
                    self.vars.get(&name).copied().ok_or(CalcError::UnknownVariable(name))
                }
            }
            Some(Token::LParen) => {
                let v = self.expr()?;
                self.expect_rparen()?;
                Ok(v)
            }
            Some(t) => Err(CalcError::UnexpectedToken(format!("{:?}", t))),
            None => Err(CalcError::UnexpectedEnd),
        }
    }

    fn expect_rparen(&mut self) -> Result<(), CalcError> {
        match self.next() {
            Some(Token::RParen) => Ok(()),
            Some(t) => Err(CalcError::UnexpectedToken(format!("{:?}", t))),
            None => Err(CalcError::UnexpectedEnd),
        }
    }
}

fn apply(name: &str, x: f64) -> Result<f64, CalcError> {
    Ok(match name {
        "sqrt" => x.sqrt(),
        "abs" => x.abs(),
        "ln" => x.ln(),
        "log10" => x.log10(),
        "sin" => x.sin(),
        "cos" => x.cos(),
        "round" => x.round(),
        _ => return Err(CalcError::UnknownFunction(name.to_string())),
    })
}

/// Evaluate one line; `name = expr` stores a variable.
pub fn eval_line(line: &str, vars: &mut HashMap<String, f64>) -> Result<f64, CalcError> {
    let tokens = tokenize(line)?;
    let (target, body) = match tokens.as_slice() {
        [Token::Ident(name), Token::Assign, rest @ ..] => (Some(name.clone()), rest),
        all => (None, all),
    };
    let mut parser = Parser { tokens: body, pos: 0, vars };
    let value = parser.expr()?;
    if parser.pos != body.len() {
        return Err(CalcError::UnexpectedToken(format!("{:?}", body[parser.pos])));
    }
    if let Some(name) = target {
        vars.insert(name, value);
    }
    vars.insert("ans".to_string(), value);
    Ok(value)
}

fn main() {
    let mut vars: HashMap<String, f64> = HashMap::new();
    vars.insert("pi".into(), std::f64::consts::PI);
    vars.insert("e".into(), std::f64::consts::E);
    let stdin = io::stdin();
    print!("> ");
    io::stdout().flush().unwrap();
    for line in stdin.lock().lines() {
        let line = line.expect("read error");
        if line.trim().is_empty() {
            print!("> ");
            io::stdout().flush().unwrap();
            continue;
        }
        match eval_line(&line, &mut vars) {
            Ok(v) => println!("{}", v),
            Err(e) => eprintln!("error: {}", e),
        }
        print!("> ");
        io::stdout().flush().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(s: &str) -> f64 {
        eval_line(s, &mut HashMap::new()).unwrap()
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(eval("2 + 3 * 4"), 14.0);
        assert_eq!(eval("(2 + 3) * 4"), 20.0);
        assert_eq!(eval("2 ^ 3 ^ 2"), 512.0);
        assert_eq!(eval("-2 ^ 2"), 4.0);
        assert_eq!(eval("10 % 4"), 2.0);
    }

    #[test]
    fn variables_and_functions() {
        let mut vars = HashMap::new();
        eval_line("r = 3", &mut vars).unwrap();
        let area = eval_line("3.14159 * r ^ 2", &mut vars).unwrap();
        assert!((area - 28.27431).abs() < 1e-4);
        assert_eq!(eval_line("sqrt(ans - 3.27431)", &mut vars).unwrap().round(), 5.0);
    }

    #[test]
    fn errors() {
        assert!(matches!(eval_line("1 / 0", &mut HashMap::new()), Err(CalcError::DivisionByZero)));
        assert!(matches!(eval_line("x + 1", &mut HashMap::new()), Err(CalcError::UnknownVariable(_))));
        assert!(matches!(eval_line("(1 + 2", &mut HashMap::new()), Err(CalcError::UnexpectedEnd)));
    }
}

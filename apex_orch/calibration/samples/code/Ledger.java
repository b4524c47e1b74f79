package example.ledger;

import java.math.BigDecimal;
import java.math.RoundingMode;
import java.time.LocalDate;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Currency;
import java.util.List;
import java.util.Map;
import java.util.Objects;
import java.util.TreeMap;
import java.util.stream.Collectors;

/**
 * A double-entry ledger: every transaction moves money between accounts and the
 * postings of a transaction always sum to zero. Amounts use BigDecimal with the
 * currency's number of fraction digits, never double.
 */
public final class Ledger {

    public record Posting(String account, BigDecimal amount) {
        public Posting {
            Objects.requireNonNull(account, "account");
            Objects.requireNonNull(amount, "amount");
        }
    }

    public record Transaction(LocalDate date, String description, List<Posting> postings) {
        public Transaction {
            postings = List.copyOf(postings);
            BigDecimal sum = postings.stream().map(Posting::amount).reduce(BigDecimal.ZERO, BigDecimal::add);
            if (sum.signum() != 0) {
                throw new IllegalArgumentException(
                        "unbalanced transaction '" + description + "': postings sum to " + sum);
            }
            if (postings.size() < 2) {
                throw new IllegalArgumentException("a transaction needs at least two postings");
            }
        }
    }

    private final Currency currency;
    private final List<Transaction> journal = new ArrayList<>();

    public Ledger(Currency currency) {
        this.currency = currency;
    }

    private BigDecimal money(String text) {
        return new BigDecimal(text).setScale(currency.getDefaultFractionDigits(), RoundingMode.UNNECESSARY);
    }

    /** Record a simple transfer of `amount` from one account to another. */
    public Transaction transfer(LocalDate date, String description, String from, String to, String amount) {
        BigDecimal value = money(amount);
        if (value.signum() <= 0) {
            throw new IllegalArgumentException("amount must be positive: " + amount);
        }
        Transaction tx = new Transaction(date, description,
                List.of(new Posting(from, value.negate()), new Posting(to, value)));
        journal.add(tx);
        return tx;
    }

    /** Split a bill evenly; any leftover cents go to the first accounts so totals stay exact. */
    public Transaction split(LocalDate date, String description, String payer, List<String> debtors, String total) {
        BigDecimal amount = money(total);
        int n = debtors.size();
        BigDecimal share = amount.divide(BigDecimal.valueOf(n), currency.getDefaultFractionDigits(), RoundingMode.DOWN);
        BigDecimal remainder = amount.subtract(share.multiply(BigDecimal.valueOf(n)));
        BigDecimal cent = BigDecimal.ONE.movePointLeft(currency.getDefaultFractionDigits());

        List<Posting> postings = new ArrayList<>();
        postings.add(new Posting(payer, amount.negate()));
        for (String debtor : debtors) {
            BigDecimal mine = share;
            if (remainder.signum() > 0) {
                mine = mine.add(cent);
                remainder = remainder.subtract(cent);
            }
            postings.add(new Posting(debtor, mine));
        }
        Transaction tx = new Transaction(date, description, postings);
        journal.add(tx);
        return tx;
    }

    public Map<String, BigDecimal> balances(LocalDate asOf) {
        return journal.stream()
                .filter(tx -> !tx.date().isAfter(asOf))
                .flatMap(tx -> tx.postings().stream())
                .collect(Collectors.groupingBy(Posting::account, TreeMap::new,
                        Collectors.reducing(BigDecimal.ZERO, Posting::amount, BigDecimal::add)));
    }

    public List<Transaction> journal() {
        return Collections.unmodifiableList(journal);
    }

    public static void main(String[] args) {
        Ledger ledger = new Ledger(Currency.getInstance("EUR"));
        LocalDate day = LocalDate.of(2025, 3, 14);
        ledger.transfer(day, "Salary", "income:salary", "assets:bank", "2850.00");
        ledger.transfer(day.plusDays(1), "Rent", "assets:bank", "expenses:rent", "950.00");
        ledger.split(day.plusDays(2), "Dinner", "assets:bank",
                List.of("expenses:food", "receivable:ana", "receivable:tom"), "100.00");

        ledger.balances(day.plusDays(30)).forEach((account, balance) ->
                System.out.printf("%-22s %10s%n", account, balance.toPlainString()));
        // assets:bank 1800.00, expenses:food 33.34, receivable:ana 33.33, receivable:tom 33.33, ...
    }
}

# File mail that trustmilter judged "junk" into the Junk folder (Dovecot Pigeonhole / any
# RFC 5228 Sieve with the fileinto extension). trustmilter writes, for every message:
#   X-Spam-Flag: YES                 only when the verdict is junk
#   X-Spam-Score: 7.30
#   X-Spam-Status: Yes, score=7.30 required=6.0 tests=BAYES_99=3,DMARC_POLICY_QUARANTINE=2,...
# the same headers SpamAssassin writes, so existing scripts keep working. A sender who forges
# "X-Spam-Flag: YES" only sends its own message to Junk; forging "NO" does not help it, because
# the test below looks for YES in any copy.
#
# Dovecot: put this in sieve_before (global, runs before users' own scripts), e.g.
#   plugin { sieve_before = /etc/dovecot/sieve/trustmilter-junk.sieve }
# and compile it: sievec /etc/dovecot/sieve/trustmilter-junk.sieve
require ["fileinto", "mailbox"];

if header :is "X-Spam-Flag" "YES" {
    fileinto :create "Junk";
    stop;
}

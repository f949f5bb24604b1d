// SPICE 1.0's scorer without the JavaScript engine (dico.metrics.spice runs it on Java 15 and later).
//
// SpiceScorer.main scores, then pretty-prints its -out file through the "JavaScript" ScriptEngine,
// Nashorn, which Java 15 removed: there the engine is null and SPICE dies after all the work. This
// runs the same SpiceScorer.scoreBatch with the same arguments minus -out, then writes the same
// per-image statistics (SpiceStats.toJSONString, the JSON that SPICE pretty-prints) itself.
// Run in Java's source-file mode (a JDK): java [flags] -cp <SPICE's jars> SpiceRun.java OUT INPUT [options]
import java.lang.reflect.Constructor;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;

public class SpiceRun {
    public static void main(String[] argv) throws Exception {
        if (argv.length < 2) {
            System.err.println("usage: SpiceRun.java OUT.json INPUT.json [SPICE options without -out]");
            System.exit(2);
        }
        // SpiceArguments(String[]) and SpiceScorer() are package-private; SPICE's classes sit in the
        // unnamed module, whose packages are open to reflection.
        Class<?> argsClass = Class.forName("edu.anu.spice.SpiceArguments");
        Constructor<?> parse = argsClass.getDeclaredConstructor(String[].class);
        parse.setAccessible(true);
        Object args = parse.newInstance((Object) Arrays.copyOfRange(argv, 1, argv.length));
        Class<?> scorerClass = Class.forName("edu.anu.spice.SpiceScorer");
        Constructor<?> make = scorerClass.getDeclaredConstructor();
        make.setAccessible(true);
        Object scorer = make.newInstance();
        scorerClass.getMethod("scoreBatch", argsClass).invoke(scorer, args);
        Object stats = scorerClass.getField("stats").get(scorer);
        String json = (String) stats.getClass().getMethod("toJSONString").invoke(stats);
        Files.write(Path.of(argv[0]), json.getBytes(StandardCharsets.UTF_8));
    }
}
